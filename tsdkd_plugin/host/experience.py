"""Carrying teacher signals through OpenRLHF's experience pipeline.

OpenRLHF's `Experience` is a fixed dataclass, and its helpers rebuild it field by
field (`Experience(**kwargs)` in `split_experience_batch`, `make_experience_batch`,
`concat_experiences`), so any extra per-token field is silently dropped on the
way to the actor. Rather than patching those helpers, the TSD-KD signals ride in
one plain attribute, ``experience.tsdkd`` (a dict of CPU tensors, see
`SIGNAL_KEYS`), and the two places that split and re-batch experiences on the
actor side are replaced by `TeacherSignalReplayBuffer`, which splits, trims and
pads those tensors exactly like upstream handles the action-aligned fields.

The buffer also keeps a prompt's n candidates together: sequence-level ListMLE
ranks the n responses of one prompt against each other, so they must land in the
same micro-batch. Items are therefore grouped by prompt and the DataLoader draws
whole groups.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from openrlhf.trainer.ppo_utils.experience import (
    Experience,
    make_experience_batch,
    remove_padding_in_sequences,
    split_experience_batch,
)
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

# The wire format is `TeacherSignals.to_wire()` (tsdkd_plugin.objective.transport) plus
# `group_ids`. Per-token tensors are [B, A, ...] aligned with `action_mask` (position t
# holds the distribution that predicts response token t); per-sample tensors are [B].
PER_TOKEN_SIGNALS = (
    "topk_logprobs",  # [B, A, K] float16 teacher log-probs at its top-K ids (sparse transport)
    "topk_ids",  # [B, A, K] int32
    "tail_logprob",  # [B, A] float16 log of the teacher's mass outside its top-K
    "entropy",  # [B, A] float32 teacher entropy over the full shared vocabulary
    "candidate_ids",  # [B, A, k] int32 the student's top-k candidates at experience time, in the teacher's order
    "candidate_logprobs",  # [B, A, k] float16 teacher log-probs at those candidates
)
PER_SAMPLE_SIGNALS = (
    "sequence_scores",  # [B] length-normalized teacher log-likelihood of the response
    "group_ids",  # [B] which prompt the sample answers (a group is ranked against itself)
)
SIGNAL_KEYS = PER_TOKEN_SIGNALS + PER_SAMPLE_SIGNALS


def split_signals(signals: Dict[str, torch.Tensor], batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """One dict per sample; per-token tensors keep their (padded) token dimension."""
    rows = [dict() for _ in range(batch_size)]
    for key, value in signals.items():
        if value is None:
            continue
        if value.shape[0] != batch_size:
            raise ValueError(f"teacher signal '{key}' has batch {value.shape[0]}, expected {batch_size}")
        for i in range(batch_size):
            rows[i][key] = value[i]
    return rows


def trim_signals(row: Dict[str, torch.Tensor], num_actions: int) -> Dict[str, torch.Tensor]:
    """Drop right padding from one sample's per-token signals (as upstream trims action fields)."""
    return {k: (v[:num_actions] if k in PER_TOKEN_SIGNALS else v) for k, v in row.items()}


def merge_signals(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample dicts, right-padding per-token tensors to the longest response (zeros,
    masked out later by `action_mask`, exactly as `make_experience_batch` pads)."""
    merged = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if key in PER_TOKEN_SIGNALS:
            longest = max(v.shape[0] for v in values)
            values = [F.pad(v, [0, 0] * (v.dim() - 1) + [0, longest - v.shape[0]]) for v in values]
        merged[key] = torch.stack(values)
    return merged


class TeacherSignalReplayBuffer(NaiveReplayBuffer):
    """NaiveReplayBuffer that keeps `experience.tsdkd` and draws whole prompt groups.

    `group_size` is the number of samples of one prompt that must share a micro-batch
    (n_samples_per_prompt with sequence-level ranking, else 1). The DataLoader batch
    size is in groups: micro_train_batch_size // group_size.
    """

    def __init__(self, micro_train_batch_size: int, group_size: int, limit: int = 0, cpu_offload: bool = True):
        if group_size < 1 or micro_train_batch_size % group_size:
            raise ValueError(
                f"--train.micro_batch_size ({micro_train_batch_size}) must be a multiple of the ranking group "
                f"size ({group_size}) so that a prompt's candidates share a micro-batch"
            )
        super().__init__(micro_train_batch_size // group_size, limit, cpu_offload, False, False)
        self.group_size = group_size
        self.groups: List[List[Experience]] = []

    @torch.no_grad()
    def append(self, experience: Experience) -> None:
        signals = getattr(experience, "tsdkd", None)
        if signals is None:
            raise ValueError("TSD-KD experience arrived without teacher signals (experience.tsdkd is missing)")
        if self.cpu_offload:
            experience.to_device(torch.device("cpu"))
            signals = {k: v.cpu() for k, v in signals.items()}
        batch_size = len(experience.sequences)
        signal_rows = split_signals(signals, batch_size)
        items = remove_padding_in_sequences(split_experience_batch(experience))
        for item, row in zip(items, signal_rows):
            item.tsdkd = trim_signals(row, item.action_mask.shape[0])
        self.items.extend(items)

    def finalize_groups(self) -> None:
        """Group the appended samples by prompt; call once all experiences of a step are in.

        Without sequence-level ranking (group_size 1) every sample is its own group, so the
        DataLoader's batch of micro_train_batch_size groups is that many samples."""
        if self.group_size == 1:
            self.groups = [[item] for item in self.items]
            return
        by_group: Dict[int, List[Experience]] = {}
        for item in self.items:
            by_group.setdefault(int(item.tsdkd["group_ids"]), []).append(item)
        self.groups = list(by_group.values())
        sizes = sorted({len(g) for g in self.groups})
        if self.group_size > 1 and sizes != [self.group_size]:
            raise ValueError(
                f"prompt groups of sizes {sizes} reached this actor, but sequence-level ranking needs all "
                f"{self.group_size} samples of a prompt on one actor: make --rollout.micro_batch_size a "
                f"multiple of --rollout.n_samples_per_prompt"
            )

    def clear(self) -> None:
        super().clear()
        self.groups = []

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, idx: int) -> List[Experience]:
        return self.groups[idx]

    def collate_fn(self, batch: List[List[Experience]]) -> Experience:
        items = list(itertools.chain.from_iterable(batch))
        experience = make_experience_batch(items, self.packing_samples)
        experience.tsdkd = merge_signals([item.tsdkd for item in items])
        return experience

    def sample(self) -> Experience:  # upstream's random sampling is not used by the PPO loop
        raise NotImplementedError("TeacherSignalReplayBuffer is consumed through its DataLoader")


def signals_to_device(signals: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in signals.items()}


def group_ids_from_rollout_index(index: Optional[List[int]], n_samples_per_prompt: int) -> torch.Tensor:
    """Rollout samples are prompt-major (n consecutive samples per prompt, which is how
    upstream's `compute_advantages_and_returns` reshapes rewards), so the prompt of rollout
    sample i is i // n."""
    if index is None:
        raise ValueError("experience.index is missing; it is set by RemoteExperienceMaker.split_rollout_samples")
    return torch.tensor([i // n_samples_per_prompt for i in index], dtype=torch.long)
