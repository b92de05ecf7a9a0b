"""Flags alone: every check of `train_tsdkd`'s options that needs no file, model or cluster.

Runs at parse time (`cli.train_tsdkd.parse_args`), on the parsed flags *before* upstream's own
post-parse code, which divides by some of them (`--rollout.micro_batch_size 0`,
`--ds.tensor_parallel_size 0`: ZeroDivisionError) or dereferences others (`--algo.advantage.estimator
gae` without a critic: AttributeError). Upstream's own validations (asserts) still run afterwards.

Here the typed run configuration is built, once (`check_options` returns it): every `--tsdkd.*` and
`--teacher.*` value is checked by the config class it lands in (host/run_config.py, the objective's
`TSDKDConfig`), not here. Checked here, each answered with one sentence naming the flag and what
would be valid:
- required flags (`REQUIRED_OPTION_HINTS`);
- ranges of upstream flags (`RANGES`): numbers that fail later in a worker, in DeepSpeed or in vLLM;
- upstream options TSD-KD does not use (`UNUSED_UPSTREAM`): a value other than the default would
  be silently ignored (a PPO clip range, a critic, a KL penalty), so it is refused;
- names checked against what the library that reads them knows (scheduler, attention kernel, dtypes),
  and Python packages a flag needs;
- combinations, including of TSD-KD options with upstream flags (batch arithmetic, objective vs
  rollout, a loss that would train nothing, LoRA, checkpoint and evaluation flags).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from tsdkd_plugin.host.args import ArgumentError, run_config_from_args
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.objective import TSDKDConfig

REQUIRED_OPTION_HINTS = {
    "--actor.model_name_or_path": "the student: a HF model name or a local model directory",
    "--teacher.model_name_or_path": "the teacher: a HF model name or a local model directory using the student's tokenizer",
    "--data.prompt_dataset": "a JSONL file, a dataset directory or a HF dataset name",
}

# vLLM 0.29's SamplingParams raises a temperature in (0, 0.01) to 0.01 (with a warning); only 0 is greedy.
VLLM_MIN_TEMPERATURE = 0.01
# numpy's seed (transformers.set_seed seeds it in every worker) must be in [0, 2**32).
MAX_SEED = 2**32 - 1


def value_of(args: SimpleNamespace, dest: str):
    """args.a.b.c for dest "a.b.c" (the parsed, hierarchical arguments)."""
    return functools.reduce(getattr, dest.split("."), args)


def require_option(option: str, value) -> None:
    if value in (None, ""):
        raise ArgumentError(f"{option} is required: {REQUIRED_OPTION_HINTS.get(option, 'set it')}")


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """A number's valid range; `when(args)` limits the check to launches that use the flag."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None (the flag's "unset") is valid
    when: Callable[[SimpleNamespace], bool] | None = None
    why: str = ""  # what fails otherwise, appended to the message

    def holds(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, (list, tuple)):
            return all(self.holds(v) for v in value)
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)  # NaN fails both

    def describe(self) -> str:
        low, high = (int(b) if float(b).is_integer() else b for b in (self.low, self.high))
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)
UNIT_LOW_OPEN = Range(0, 1, low_open=True)


def _muon(args) -> bool:
    return args.actor.optim == "muon"


RANGES: dict[str, Range] = {
    "actor.num_nodes": AT_LEAST_1,
    "actor.num_gpus_per_node": AT_LEAST_1,
    "vllm.tensor_parallel_size": AT_LEAST_1,
    "vllm.gpu_memory_utilization": Range(0, 1, low_open=True, why="(the fraction of GPU memory vLLM may use)"),
    "ds.tensor_parallel_size": AT_LEAST_1,
    "ds.ring_attn_size": AT_LEAST_1,
    "ds.ring_attn_head_stride": AT_LEAST_1,
    "ds.zpg": AT_LEAST_1,
    "ds.zero_stage": Range(0, 3, why="(DeepSpeed's ZeRO stages are 0, 1, 2 and 3)"),
    "ds.lora.alpha": Range(0, low_open=True, when=lambda a: a.ds.lora.rank > 0),
    "ds.lora.dropout": Range(0, 1, high_open=True, when=lambda a: a.ds.lora.rank > 0),
    "data.dataloader_num_workers": AT_LEAST_0,
    "data.max_samples": Range(1, why="(how many prompts of the dataset to use)"),
    "data.max_images_per_prompt": AT_LEAST_0,
    "train.num_episodes": AT_LEAST_1,
    "train.max_epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.micro_batch_size": AT_LEAST_1,
    "train.seed": Range(0, MAX_SEED, why="(numpy's seed range, which every worker is seeded with)"),
    "train.ema_beta": Range(0, 1, low_open=True, high_open=True, when=lambda a: a.train.enable_ema),
    "train.async_queue_size": AT_LEAST_1,
    "train.max_tokens_per_gpu": AT_LEAST_1,
    "rollout.batch_size": AT_LEAST_1,
    "rollout.micro_batch_size": AT_LEAST_1,
    "rollout.n_samples_per_prompt": AT_LEAST_1,
    "rollout.vllm_generate_batch_size": Range(1, optional=True),
    "rollout.max_tokens_per_gpu": Range(1, optional=True),
    "rollout.top_p": Range(0, 1, low_open=True, why="(vLLM samples from the smallest set of tokens with this much mass)"),
    "eval.n_samples_per_prompt": Range(1, when=lambda a: bool(a.eval.dataset)),
    "logger.logging_steps": Range(1, why="(log every N steps)"),
    "ckpt.max_mem": Range(0, low_open=True, why="(GiB the checkpoints may take)"),
    "actor.adam.lr": Range(0, low_open=True),
    "actor.adam.betas": Range(0, 1, high_open=True),
    "actor.adam.eps": Range(0, low_open=True),
    "actor.adam.weight_decay": AT_LEAST_0,
    "actor.lr_warmup_ratio": UNIT,
    "actor.min_lr_ratio": UNIT,
    "actor.max_norm": Range(0, why="(0 turns gradient clipping off)"),
    "actor.muon.lr": Range(0, low_open=True, when=_muon),
    "actor.muon.momentum": Range(0, 1, high_open=True, when=_muon),
    "actor.muon.ns_steps": Range(1, when=_muon),
}


def check_ranges(args: SimpleNamespace) -> None:
    for dest, rule in RANGES.items():
        if rule.when is not None and not rule.when(args):
            continue
        value = value_of(args, dest)
        if not rule.holds(value):
            why = f" {rule.why}" if rule.why else ""
            if isinstance(value, (list, tuple)):
                raise ArgumentError(f"--{dest} values must each be {rule.describe()}, got {_shown(value)}{why}")
            raise ArgumentError(f"--{dest} must be {rule.describe()}, got {value}{why}")


def check_temperature(flag: str, temperature: float) -> None:
    if not (temperature == 0 or VLLM_MIN_TEMPERATURE <= temperature < math.inf):
        raise ArgumentError(
            f"{flag} must be 0 (greedy) or >= {VLLM_MIN_TEMPERATURE:g}, got {temperature:g} "
            f"(vLLM samples any value in (0, {VLLM_MIN_TEMPERATURE:g}) at {VLLM_MIN_TEMPERATURE:g}, not greedily)"
        )


# ----------------------------------------------------------------------------- upstream options TSD-KD does not use

# Prefix or flag -> why TSD-KD ignores it and what to use instead. A value other than the parser's
# default is refused: it would be accepted by upstream's parser and then have no effect.
UNUSED_UPSTREAM: tuple[tuple[str, str], ...] = (
    ("critic.freezing_steps", "upstream freezes the policy for the first N steps while a critic warms up; TSD-KD "
                              "has no critic, so the student would just not train for N steps"),
    ("critic.", "TSD-KD trains no critic (the teacher's signals replace values and advantages)"),
    ("ref.", "TSD-KD runs no reference model (the teacher is the anchor); see --teacher.*"),
    ("reward.num_nodes", "TSD-KD runs no reward model group; a verifier reward comes from --reward.remote_url"),
    ("reward.num_gpus_per_node", "TSD-KD runs no reward model group; a verifier reward comes from --reward.remote_url"),
    ("reward.model_name_or_path", "TSD-KD runs no reward model group; a verifier reward comes from --reward.remote_url"),
    ("reward.offload", "TSD-KD runs no reward model group"),
    ("reward.normalize_enable", "TSD-KD runs no reward model group"),
    ("reward.clip_range", "TSD-KD does not shape rewards (they are logged, not trained on)"),
    ("reward.overlong_buffer_len", "TSD-KD does not shape rewards (they are logged, not trained on)"),
    ("reward.overlong_penalty_factor", "TSD-KD does not shape rewards (they are logged, not trained on)"),
    ("reward.stop_properly_penalty_coef", "TSD-KD does not shape rewards (they are logged, not trained on)"),
    ("algo.kl.", "TSD-KD has no KL penalty to a reference model (the teacher is the anchor)"),
    ("algo.advantage.", "TSD-KD computes no advantages (the loss is the TSD-KD objective, see --tsdkd.*)"),
    ("actor.eps_clip", "TSD-KD has no PPO ratio clipping"),
    ("actor.dual_clip", "TSD-KD has no PPO ratio clipping"),
    ("actor.policy_loss_type", "TSD-KD replaces the policy loss by the TSD-KD objective (--tsdkd.*)"),
    ("actor.loss_agg_mode", "TSD-KD averages its terms over response tokens (docs/objective.md)"),
    ("actor.entropy_coef", "TSD-KD's entropy term is --tsdkd.entropy_weight"),
    ("actor.aux_loss_coef", "TSD-KD's training step adds no MoE balancing loss"),
    ("train.colocate_actor_ref", "TSD-KD runs no reference model"),
    ("train.colocate_critic_reward", "TSD-KD runs no critic or reward model"),
    ("ds.value_head_prefix", "TSD-KD has no value head"),
)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_unused_upstream(args: SimpleNamespace, defaults: dict[str, object]) -> None:
    for dest, default in defaults.items():
        for prefix, why in UNUSED_UPSTREAM:
            if dest == prefix or (prefix.endswith(".") and dest.startswith(prefix)) or dest.startswith(prefix + "_"):
                value = value_of(args, dest)
                same = list(value) == list(default) if isinstance(value, (list, tuple)) and isinstance(
                    default, (list, tuple)) else value == default
                if not same:
                    raise ArgumentError(
                        f"--{dest} {_shown(value)} is not for TSD-KD: {why}; drop the flag"
                    )
                break


def check_objective_trains(config: TSDKDConfig) -> None:
    """Settings the objective accepts but that train nothing."""
    if not (config.direct_on or config.entropy_on or config.token_level_on or config.sequence_level_on):
        raise ArgumentError(
            "every term of the TSD-KD loss is off (--tsdkd.direct_weight, --tsdkd.entropy_weight, "
            "--tsdkd.indirect_weight and --tsdkd.sequence_weight are 0 for the chosen --tsdkd.indirect_level): "
            "the loss would be 0; give one of them a weight > 0"
        )
    if config.token_level_on and config.num_candidates < 2:
        raise ArgumentError(
            f"--tsdkd.num_candidates {config.num_candidates}: the token-level ranking orders the student's k "
            f"candidates, and one candidate has no order (its loss is 0); use k >= 2 or --tsdkd.indirect_weight 0"
        )


# ----------------------------------------------------------------------------- features and names


def check_unsupported_features(args: SimpleNamespace) -> None:
    """Upstream features TSD-KD's trainer does not implement (each would fail or be ignored later)."""
    if args.train.async_enable or args.train.partial_rollout_enable:
        flag = "--train.async_enable" if args.train.async_enable else "--train.partial_rollout_enable"
        raise ArgumentError(f"{flag} is not supported by TSD-KD (its trainer is synchronous); drop the flag")
    if args.ds.ring_attn_size > 1:
        raise ArgumentError(
            f"--ds.ring_attn_size {args.ds.ring_attn_size} needs --ds.packing_samples, which TSD-KD does not "
            f"support yet; use --ds.ring_attn_size 1"
        )
    if args.train.dynamic_batch_enable:
        raise ArgumentError("--train.dynamic_batch_enable is not supported by TSD-KD yet (teacher signals are batched per micro-batch)")
    if args.ds.packing_samples:
        raise ArgumentError("--ds.packing_samples is not supported by TSD-KD yet; drop the flag")
    if args.data.max_images_per_prompt > 0:
        raise ArgumentError(
            "--data.max_images_per_prompt > 0 (vision-language prompts) is not supported by TSD-KD: the teacher "
            "scores text only; use 0"
        )
    if args.ds.load_in_4bit and args.ds.lora.rank <= 0:
        raise ArgumentError(
            "--ds.load_in_4bit quantizes the student, whose weights TSD-KD trains (4-bit weights cannot be "
            "updated, and with --ds.lora.rank the vLLM sync cannot send merged 4-bit weights); drop the flag"
        )


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# DeepSpeed's DtypeEnum names for data_types.grad_accum_dtype.
GRAD_ACCUM_DTYPES = ("fp32", "float32", "float", "fp16", "float16", "half", "bf16", "bfloat16")


def attention_implementations() -> tuple[str, ...]:
    """What transformers accepts as attn_implementation (besides hub kernels "org/repo")."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ("eager",) + tuple(sorted(ALL_ATTENTION_FUNCTIONS.valid_keys()))


def check_names(args: SimpleNamespace) -> None:
    scheduler = args.actor.lr_scheduler
    if scheduler not in SCHEDULERS:
        raise ArgumentError(
            f"--actor.lr_scheduler {scheduler!r} is not a transformers scheduler; use one of {', '.join(SCHEDULERS)}"
        )
    attention = args.ds.attn_implementation
    base = attention.split("|", 1)[-1] if attention else attention
    if attention and "/" not in base and attention not in attention_implementations():
        raise ArgumentError(
            f"--ds.attn_implementation {attention!r} is not an attention implementation transformers knows; use "
            f"one of {', '.join(attention_implementations())} or a hub kernel such as kernels-community/vllm-flash-attn3"
        )
    dtype = args.ds.grad_accum_dtype
    if dtype is not None and dtype not in GRAD_ACCUM_DTYPES:
        raise ArgumentError(f"--ds.grad_accum_dtype {dtype!r} is not a DeepSpeed dtype; use fp32, bf16 or fp16")


# flag -> (is it on, import name, pip name)
PACKAGES_NEEDED = (
    (lambda a: bool(a.logger.wandb.key), "--logger.wandb.key", "wandb", "wandb"),
    (lambda a: a.ds.use_liger_kernel, "--ds.use_liger_kernel", "liger_kernel", "liger-kernel"),
    (lambda a: a.use_ms, "--use_ms", "modelscope", "modelscope"),
    (lambda a: bool(a.logger.tensorboard_dir), "--logger.tensorboard_dir", "tensorboard", "tensorboard"),
)


def check_packages(args: SimpleNamespace) -> None:
    """Packages a flag needs, importable on this node (the Ray workers share its environment)."""
    for enabled, flag, module, package in PACKAGES_NEEDED:
        if enabled(args) and importlib.util.find_spec(module) is None:
            raise ArgumentError(f"{flag} needs the Python package {package!r}, which is not installed; "
                                f"pip install {package} or drop the flag")


# ----------------------------------------------------------------------------- combinations


def data_parallel_ranks(args: SimpleNamespace) -> int:
    """Policy ranks that each train on their own samples (upstream: world // ring // TP)."""
    world = args.actor.num_nodes * args.actor.num_gpus_per_node
    return world // (args.ds.ring_attn_size * args.ds.tensor_parallel_size)


def check_batch_arithmetic(args: SimpleNamespace) -> None:
    """What DeepSpeed and upstream's trainer assert, or silently get wrong, about batch sizes."""
    world = args.actor.num_nodes * args.actor.num_gpus_per_node
    model_parallel = args.ds.ring_attn_size * args.ds.tensor_parallel_size
    if world % model_parallel:
        raise ArgumentError(
            f"--actor.num_nodes x --actor.num_gpus_per_node ({world}) must be a multiple of --ds.tensor_parallel_size "
            f"({args.ds.tensor_parallel_size})"
        )
    ranks = data_parallel_ranks(args)
    micro, batch = args.train.micro_batch_size, args.train.batch_size
    if batch % (micro * ranks):
        raise ArgumentError(
            f"--train.batch_size ({batch}) must be a multiple of --train.micro_batch_size ({micro}) x {ranks} "
            f"data-parallel policy rank(s) (--actor.num_nodes x --actor.num_gpus_per_node"
            f"{' / --ds.tensor_parallel_size' if model_parallel > 1 else ''}) = {micro * ranks}, which DeepSpeed requires"
        )
    samples = args.rollout.batch_size * args.rollout.n_samples_per_prompt
    if samples // args.rollout.micro_batch_size < ranks:
        raise ArgumentError(
            f"a rollout of --rollout.batch_size x --rollout.n_samples_per_prompt = {samples} samples makes "
            f"{samples // args.rollout.micro_batch_size} micro-batch(es) of --rollout.micro_batch_size "
            f"{args.rollout.micro_batch_size}, fewer than the {ranks} policy ranks that each need one; raise "
            f"--rollout.batch_size or lower --rollout.micro_batch_size"
        )
    engines_gpus = args.vllm.num_engines * args.vllm.tensor_parallel_size
    if args.train.colocate_all and engines_gpus != world:
        raise ArgumentError(
            f"--train.colocate_all puts the vLLM engines on the policy's GPUs: --vllm.num_engines x "
            f"--vllm.tensor_parallel_size ({engines_gpus}) must equal --actor.num_nodes x --actor.num_gpus_per_node "
            f"({world})"
        )
    generate = args.rollout.vllm_generate_batch_size
    if generate is not None and generate > args.rollout.batch_size:
        raise ArgumentError(
            f"--rollout.vllm_generate_batch_size ({generate}) > --rollout.batch_size ({args.rollout.batch_size}) "
            f"over-samples for upstream's asynchronous trainer, which TSD-KD does not support; drop the flag"
        )


def prompt_token_budget(args: SimpleNamespace) -> int:
    """Prompt tokens that fit uncut. OpenRLHF's rollout keeps the last max_len - max_new_tokens
    prompt tokens (it drops the beginning of a longer prompt, chat header included); without
    --rollout.max_new_tokens the response gets max_len - prompt tokens, so at least one must remain."""
    max_new = args.rollout.max_new_tokens
    return args.data.max_len - (max_new if max_new is not None else 1)


def check_prompt_fits(args: SimpleNamespace) -> None:
    """Flags alone: a response needs room in --data.max_len."""
    max_new = args.rollout.max_new_tokens
    if max_new is not None and max_new < 1:
        raise ArgumentError(f"--rollout.max_new_tokens must be >= 1, got {max_new}")
    if prompt_token_budget(args) < 1:
        raise ArgumentError(
            f"--data.max_len ({args.data.max_len}) leaves no room for a prompt after --rollout.max_new_tokens "
            f"({max_new}); raise --data.max_len above {max_new} or lower --rollout.max_new_tokens"
        )


def check_checkpoint_flags(args: SimpleNamespace) -> None:
    """Upstream flags whose bad values fail late (a ZeroDivisionError at the first step or save)."""
    for flag, steps, what in (("--ckpt.save_steps", args.ckpt.save_steps, "save every N steps"),
                              ("--eval.steps", args.eval.steps, "evaluate every N steps")):
        if steps == 0 or steps < -1:
            raise ArgumentError(f"{flag} must be >= 1 ({what}) or -1 (never), got {steps}")
    save_steps = args.ckpt.save_steps
    if save_steps != -1 and args.ckpt.max_num < 1:
        raise ArgumentError(
            f"--ckpt.max_num must be >= 1 to keep the checkpoints --ckpt.save_steps {save_steps} writes, "
            f"got {args.ckpt.max_num}"
        )


def check_evaluation_flags(args: SimpleNamespace) -> None:
    if not args.eval.dataset:
        return
    if not (args.reward.remote_url or args.train.agent_func_path):
        raise ArgumentError(
            "--eval.dataset scores its samples with a verifier: set --reward.remote_url (a reward_func .py file or "
            "an HTTP URL) or --train.agent_func_path"
        )
    check_temperature("--eval.temperature", args.eval.temperature)


def check_prompt_probs(args: SimpleNamespace) -> None:
    """--data.prompt_probs: one probability per dataset, summing to 1 (HF's interleave_datasets)."""
    text = args.data.prompt_probs
    if not text:
        return
    datasets = [part for part in (args.data.prompt_dataset or "").split(",") if part.strip()]
    try:
        probabilities = [float(part) for part in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--data.prompt_probs {text!r} must be comma-separated numbers, one per dataset") from None
    if len(probabilities) != len(datasets):
        raise ArgumentError(
            f"--data.prompt_probs has {len(probabilities)} value(s) for {len(datasets)} dataset(s) in "
            f"--data.prompt_dataset; give one probability per dataset"
        )
    if any(not 0 <= p <= 1 for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
        raise ArgumentError(f"--data.prompt_probs {text!r} must be probabilities in [0, 1] that sum to 1")


def check_input_template(args: SimpleNamespace) -> None:
    template = args.data.input_template
    if template and not args.data.apply_chat_template:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as error:
            raise ArgumentError(
                f"--data.input_template {template!r} cannot format a prompt ({type(error).__name__}: "
                f"{error}); it needs exactly one {{}} and other braces doubled"
            ) from None


def check_objective_vs_rollout(args: SimpleNamespace, run: RunConfig) -> None:
    config = run.objective
    n = args.rollout.n_samples_per_prompt
    if config.sequence_level_on:
        if n < 2:
            raise ArgumentError(
                f"--tsdkd.indirect_level {config.indirect_level!r} ranks a prompt's candidates, which needs "
                f"--rollout.n_samples_per_prompt >= 2 (got {n}); or use --tsdkd.indirect_level token"
            )
        for option, value in (("--rollout.micro_batch_size", args.rollout.micro_batch_size),
                              ("--train.micro_batch_size", args.train.micro_batch_size)):
            if value % n:
                raise ArgumentError(
                    f"{option} ({value}) must be a multiple of --rollout.n_samples_per_prompt ({n}) so a prompt's "
                    f"candidates stay in one micro-batch for sequence-level ranking"
                )
    if run.on_policy_fraction < 1.0 and not args.data.label_key:
        raise ArgumentError(
            "--tsdkd.on_policy_fraction < 1 trains some steps on the dataset's reference responses: set "
            "--data.label_key to the response column"
        )
    if not args.vllm.num_engines or args.vllm.num_engines < 1:
        raise ArgumentError("--vllm.num_engines must be >= 1: TSD-KD samples the student's candidates with vLLM")
    if args.ds.lora.rank < 0:
        raise ArgumentError(f"--ds.lora.rank must be >= 0 (0: train full weights), got {args.ds.lora.rank}")
    if args.ds.lora.rank > 0 and args.ds.tensor_parallel_size > 1:
        raise ArgumentError(
            "--ds.lora.rank > 0 with --ds.tensor_parallel_size > 1 is not supported by TSD-KD: the merged LoRA "
            "weights sent to vLLM are built from unsplit layers; use --ds.tensor_parallel_size 1 (ZeRO shards instead)"
        )
    if args.ds.lora.rank > 0 and args.ds.load_in_4bit:
        raise ArgumentError(
            "--ds.load_in_4bit with --ds.lora.rank > 0 (QLoRA) is not supported by TSD-KD: vLLM would receive "
            "merged 4-bit weights it cannot load; drop --ds.load_in_4bit"
        )


def check_options(args: SimpleNamespace, defaults: dict[str, object]) -> RunConfig:
    """Every flag-only check, on the parsed arguments before upstream's post-parse code.
    `defaults`: each flag's parser default (dest -> value). Returns the typed run configuration,
    built here once (each --tsdkd.* / --teacher.* value is checked by the config class it lands in)."""
    for option in REQUIRED_OPTION_HINTS:
        require_option(option, value_of(args, option[2:]))
    check_ranges(args)
    check_temperature("--rollout.temperature", args.rollout.temperature)
    check_unsupported_features(args)
    run = run_config_from_args(args)  # TSDKDConfig / TeacherConfig / RunConfig.__post_init__
    check_objective_vs_rollout(args, run)
    check_objective_trains(run.objective)
    check_unused_upstream(args, defaults)
    check_names(args)
    check_batch_arithmetic(args)
    check_prompt_fits(args)
    check_checkpoint_flags(args)
    check_evaluation_flags(args)
    check_prompt_probs(args)
    check_input_template(args)
    check_packages(args)
    return run


def normalize_options(args: SimpleNamespace) -> SimpleNamespace:
    """Values upstream accepts but passes on in a form its consumer misreads.

    `--ds.lora.target_modules all-linear` typed on the command line arrives as the list
    ["all-linear"] (nargs="*"), which PEFT takes as a module name and fails on inside the policy
    actor ("Target modules {'all-linear'} not found"); only the string (the flag's default) is
    PEFT's shorthand for every linear layer."""
    targets = args.ds.lora.target_modules
    if isinstance(targets, list) and [t.lower() for t in targets] == ["all-linear"]:
        args.ds.lora.target_modules = "all-linear"
    return args
