"""TeacherSignalReplayBuffer: signals stay with their samples, and a DataLoader batch holds
--train.micro_batch_size samples whether or not prompt groups must stay together."""

import pytest
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from torch.utils.data import DataLoader

from tsdkd_plugin.host.experience import TeacherSignalReplayBuffer


def rollout_batch(num_prompts, n, first_prompt=0, length=5):
    """One experience of num_prompts x n samples, prompt-major, with per-token and per-sample signals."""
    rows = num_prompts * n
    sequences = torch.arange(rows * length).reshape(rows, length)
    signals = {
        "entropy": torch.arange(rows * (length - 1), dtype=torch.float).reshape(rows, length - 1),
        "sequence_scores": torch.arange(rows, dtype=torch.float),
        "group_ids": torch.arange(first_prompt, first_prompt + num_prompts).repeat_interleave(n),
    }
    experience = Experience(
        sequences=sequences,
        attention_mask=torch.ones(rows, length, dtype=torch.long),
        action_mask=torch.ones(rows, length - 1, dtype=torch.long),
        info={},
    )
    experience.tsdkd = signals
    return experience


@pytest.mark.parametrize("group_size", [1, 4])
def test_micro_batches_hold_micro_batch_size_samples(group_size):
    buffer = TeacherSignalReplayBuffer(micro_train_batch_size=8, group_size=group_size, cpu_offload=False)
    buffer.append(rollout_batch(num_prompts=4, n=4))
    buffer.append(rollout_batch(num_prompts=4, n=4, first_prompt=4))
    buffer.finalize_groups()
    loader = DataLoader(
        buffer, batch_size=buffer.sample_batch_size, shuffle=True, drop_last=True, collate_fn=buffer.collate_fn
    )
    batches = list(loader)
    assert len(batches) == 32 // 8
    for batch in batches:
        assert batch.sequences.shape[0] == 8 and batch.tsdkd["entropy"].shape == (8, 4)
        # each row's signals travelled with its own sample
        assert torch.equal(batch.tsdkd["entropy"][:, 0], (batch.sequences[:, 0] // 5 * 4).float())
        if group_size > 1:
            assert sorted(torch.bincount(batch.tsdkd["group_ids"]).tolist())[-2:] == [4, 4]


def test_groups_split_across_actors_are_refused():
    buffer = TeacherSignalReplayBuffer(micro_train_batch_size=8, group_size=4, cpu_offload=False)
    experience = rollout_batch(num_prompts=2, n=4)
    experience.tsdkd["group_ids"][-1] = 7  # one sample of a prompt whose other samples went elsewhere
    buffer.append(experience)
    with pytest.raises(ValueError, match="multiple of --rollout.n_samples_per_prompt"):
        buffer.finalize_groups()
