"""The run configuration: every `--tsdkd.*` and `--teacher.*` option, typed, frozen, validated once.

Built by the CLI from the parsed flags (`host/args.py` `run_config_from_args`, called at parse time by
`cli/train_tsdkd.py` through `preflight/options.py` `check_options`) and passed as it is to every
Ray actor: the trainer (`TSDKDTrainer(run=...)`), each policy actor
(`init_model_from_pretrained(run=...)`) and each teacher actor (the same). Past the CLI nothing reads
`args.tsdkd` or `args.teacher`: an option's value is an attribute of `run`.

Flag -> field (the flags are generated from these fields and their docstrings by host/args.py):

    --tsdkd.<objective field>     run.objective.<field>  (TSDKDConfig; --tsdkd.preset fills it first)
    --teacher.sparse_top_k        run.objective.sparse_top_k
    --teacher.<name>              run.teacher.<name>     (TeacherConfig)
    --tsdkd.student_logits, --tsdkd.on_policy_fraction, --tsdkd.max_nonfinite_steps   run.<name>
    (derived from the flags)      run.ranking_group_size

Each class checks its own values in `__post_init__` and says what is wrong in one sentence naming
the flag (TSDKDConfig names its field, which `run_config_from_args` turns into the flag).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from tsdkd_plugin.host.numerics import DEFAULT_MAX_NONFINITE_STEPS
from tsdkd_plugin.host.student_step import DEFAULT_STUDENT_LOGITS, STUDENT_LOGITS_MODES
from tsdkd_plugin.objective import TSDKDConfig

TeacherPlacement = Literal["separate", "colocate"]
TEACHER_PLACEMENTS: tuple[str, ...] = typing.get_args(TeacherPlacement)
StudentLogits = Literal["fused", "full"]

# Fields of RunConfig that are not flags of their own (sub-configs, derived values).
NOT_A_FLAG = {"flag": False}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(flag: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: which model, where it runs, how long the run waits for it (`--teacher.*`;
    its K of the sparse transport is the objective's `sparse_top_k`)."""

    model_name_or_path: str
    """HF model name or local path of the teacher (required); must use the student's tokenizer."""

    placement: TeacherPlacement = "separate"
    """separate: own GPUs, sparse top-K transport through Ray; colocate: loaded inside each policy
    actor, dense logits, no transport."""

    num_nodes: int = 1
    """Nodes for the teacher group (separate placement)."""

    num_gpus_per_node: int = 1
    """GPUs per node for the teacher group (separate placement)."""

    offload: bool = False
    """Offload teacher weights to CPU between forwards (DeepSpeed)."""

    timeout_s: float = 1800.0
    """Seconds one step's teacher forward may take before it is retried (docs/reliability.md)."""

    max_retries: int = 2
    """Retries of a failed or timed-out teacher forward before the run stops with the latest
    checkpoint intact."""

    def __post_init__(self) -> None:
        _check_choice("--teacher.placement", self.placement, TEACHER_PLACEMENTS)
        if self.has_own_group:  # a colocated teacher uses the policy's GPUs; shared command lines may still pass these
            for name in ("num_nodes", "num_gpus_per_node"):
                value = getattr(self, name)
                if not _is_int(value) or value < 1:
                    raise ValueError(f"--teacher.{name} must be >= 1, got {value}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"--teacher.offload must be true or false, got {self.offload!r}")
        if not _is_finite_real(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"--teacher.timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        if not _is_int(self.max_retries) or self.max_retries < 0:
            raise ValueError(f"--teacher.max_retries must be an integer >= 0, got {self.max_retries}")

    @property
    def has_own_group(self) -> bool:
        """The teacher runs as a Ray group of its own (separate placement), not inside the policy actors."""
        return self.placement == "separate"


@dataclass(frozen=True)
class RunConfig:
    """Everything a TSD-KD run is configured with beyond upstream's flags: the objective, the
    teacher, the student's step and the guards that stop a broken run (the teacher's timeout and
    retries, `max_nonfinite_steps`)."""

    objective: TSDKDConfig = field(metadata=NOT_A_FLAG)
    """The loss (--tsdkd.<field>, --tsdkd.preset, --teacher.sparse_top_k)."""

    teacher: TeacherConfig = field(metadata=NOT_A_FLAG)
    """The teacher (--teacher.*)."""

    ranking_group_size: int = field(default=1, metadata=NOT_A_FLAG)
    """How many samples must share a micro-batch: --rollout.n_samples_per_prompt with sequence-level
    ranking (they are ranked against each other), else 1."""

    student_logits: StudentLogits = DEFAULT_STUDENT_LOGITS
    """fused: the objective makes the student's logits from its final hidden states and output
    embedding, chunk_size tokens at a time, with their exact gradient (no [tokens x vocabulary]
    tensor); full: upstream Actor's full logits, the earlier path, kept for comparison."""

    on_policy_fraction: float = 1.0
    """lambda: probability that a step trains on the student's own samples; other steps use the
    dataset's reference responses from --data.label_key (GKD-style mixing). 1.0 = fully on-policy
    (reference)."""

    max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS
    """Micro-batches with a NaN/inf loss are skipped (logged as tsdkd/nonfinite_skipped); this many in
    a row stop the run."""

    def __post_init__(self) -> None:
        if not isinstance(self.objective, TSDKDConfig):
            raise ValueError(f"RunConfig.objective must be a TSDKDConfig, got {type(self.objective).__name__}")
        if not isinstance(self.teacher, TeacherConfig):
            raise ValueError(f"RunConfig.teacher must be a TeacherConfig, got {type(self.teacher).__name__}")
        if not _is_int(self.ranking_group_size) or self.ranking_group_size < 1:
            raise ValueError(f"RunConfig.ranking_group_size must be an integer >= 1, got {self.ranking_group_size!r}")
        _check_choice("--tsdkd.student_logits", self.student_logits, STUDENT_LOGITS_MODES)
        if not _is_finite_real(self.on_policy_fraction) or not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"--tsdkd.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if not _is_int(self.max_nonfinite_steps) or self.max_nonfinite_steps < 1:
            raise ValueError(f"--tsdkd.max_nonfinite_steps must be an integer >= 1, got {self.max_nonfinite_steps}")
