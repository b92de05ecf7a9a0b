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
from urllib.parse import urlsplit

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


def parse_server_urls(text: str) -> tuple[str, ...]:
    """'http://a:8000,http://b:8000' -> ('http://a:8000', 'http://b:8000'): base URLs of vLLM
    OpenAI-compatible servers (a trailing '/' or '/v1' is dropped: the client adds the paths).
    Raises ValueError naming the bad entry."""
    urls = []
    for part in (text or "").split(","):
        url = part.strip().rstrip("/")
        if not url:
            continue
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{part.strip()!r} is not an http(s) URL with a host, e.g. http://10.0.0.5:8000")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise ValueError(f"{part.strip()!r} has an invalid port") from None
        urls.append(url)
    if not urls:
        raise ValueError("no URL given; e.g. http://10.0.0.5:8000 (several: comma-separated)")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{text!r} names the same server twice")
    return tuple(urls)


def _check_choice(flag: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: which model, where it runs, how long the run waits for it (`--teacher.*`;
    its K of the sparse transport is the objective's `sparse_top_k`)."""

    model_name_or_path: str
    """HF model name or local path of the teacher (required); must use the student's tokenizer. With
    --teacher.remote_url: the model name the server serves (vllm serve --served-model-name)."""

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
    """Seconds one step's teacher forward (with --teacher.remote_url: one scoring request) may take
    before it is retried (docs/reliability.md)."""

    max_retries: int = 2
    """Retries of a failed or timed-out teacher forward (with --teacher.remote_url: of one scoring
    request, with backoff, on connection errors, timeouts and HTTP 5xx/408/429) before the run stops
    with the latest checkpoint intact."""

    remote_url: str = ""
    """Base URL(s) of a vLLM OpenAI-compatible server that serves the teacher (vllm serve;
    comma-separated for several replicas), e.g. http://10.0.0.5:8000. The teacher is then an HTTP
    client: no teacher group is started; see docs/server_teacher.md for the server's flags."""

    remote_top_k: int = 0
    """With --teacher.remote_url: log-probs per position asked of the server (vLLM prompt_logprobs;
    start it with --max-logprobs at least this); 0 = --teacher.sparse_top_k. More than K makes the
    entropy and the teacher's scores of the student's candidates exact at more positions."""

    remote_concurrency: int = 16
    """With --teacher.remote_url: scoring requests in flight at once, over all servers (one request
    scores one sample)."""

    def __post_init__(self) -> None:
        _check_choice("--teacher.placement", self.placement, TEACHER_PLACEMENTS)
        if self.remote_url:
            self._check_remote()
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

    def _check_remote(self) -> None:
        """A served teacher has no placement, group or weights of its own in the job."""
        try:
            parse_server_urls(self.remote_url)
        except ValueError as error:
            raise ValueError(f"--teacher.remote_url: {error}") from None
        if self.placement != "separate":
            raise ValueError(
                f"--teacher.placement {self.placement} loads the teacher into the policy actors, but "
                f"--teacher.remote_url serves it elsewhere; give one of the two"
            )
        for name in ("num_nodes", "num_gpus_per_node"):
            if getattr(self, name) != 1:
                raise ValueError(
                    f"--teacher.{name} {getattr(self, name)} sizes a teacher group, but with "
                    f"--teacher.remote_url no teacher group is started; drop --teacher.{name}"
                )
        if self.offload:
            raise ValueError(
                "--teacher.offload offloads a teacher loaded in the job, but with --teacher.remote_url "
                "the server holds the weights; drop --teacher.offload"
            )
        if not _is_int(self.remote_top_k) or self.remote_top_k < 0:
            raise ValueError(
                f"--teacher.remote_top_k must be an integer >= 0 (0: --teacher.sparse_top_k), got {self.remote_top_k}"
            )
        if not _is_int(self.remote_concurrency) or self.remote_concurrency < 1:
            raise ValueError(f"--teacher.remote_concurrency must be an integer >= 1, got {self.remote_concurrency}")

    @property
    def has_own_group(self) -> bool:
        """The teacher runs as a Ray group of its own (separate placement), not inside the policy actors
        nor behind a server."""
        return self.placement == "separate" and not self.remote_url

    @property
    def served(self) -> bool:
        """The teacher is a vLLM server's (--teacher.remote_url): an HTTP client on the driver."""
        return bool(self.remote_url)

    @property
    def remote_urls(self) -> tuple[str, ...]:
        return parse_server_urls(self.remote_url) if self.remote_url else ()


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
        if self.teacher.served:
            self._check_served_teacher()

    def _check_served_teacher(self) -> None:
        # vLLM applies no temperature to prompt log-probs (its logprobs_mode gives the raw distribution).
        if self.objective.temperature != 1.0:
            raise ValueError(
                f"--tsdkd.temperature {self.objective.temperature:g} needs the teacher's logits at that "
                f"temperature, but a vLLM server gives prompt log-probs at temperature 1 only; with "
                f"--teacher.remote_url use --tsdkd.temperature 1"
            )
        if self.teacher.remote_top_k and self.teacher.remote_top_k < self.objective.sparse_top_k:
            raise ValueError(
                f"--teacher.remote_top_k {self.teacher.remote_top_k} must be >= --teacher.sparse_top_k "
                f"{self.objective.sparse_top_k} (the top-K shipped to the actors is cut from what the "
                f"server lists), or 0 for the same"
            )

    @property
    def server_top_k(self) -> int:
        """Log-probs per position asked of a teacher server (--teacher.remote_top_k, else K)."""
        return self.teacher.remote_top_k or self.objective.sparse_top_k
