"""`--teacher.*` and `--tsdkd.*` argument groups, TSD-KD defaults for upstream flags,
and the checks that must fail before any Ray worker starts.

The objective's flags are generated from `TSDKDConfig`'s fields, so the CLI can
never drift from the config object (each field's help text is its documentation).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import typing
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Dict

from tsdkd_plugin.host.numerics import DEFAULT_MAX_NONFINITE_STEPS
from tsdkd_plugin.objective import PRESETS, TSDKDConfig
from tsdkd_plugin.objective.config import GATE_KINDS, INDIRECT_LEVELS, LISTMLE_FORMS, REDUCTIONS

CONFIG_FIELD_CHOICES = {
    "gate": GATE_KINDS, "indirect_level": INDIRECT_LEVELS, "listmle_form": LISTMLE_FORMS,
    "direct_reduction": REDUCTIONS, "entropy_reduction": REDUCTIONS,
}

TEACHER_PLACEMENTS = ("separate", "colocate")
DEFAULT_TEACHER_TIMEOUT_S = 1800.0
DEFAULT_TEACHER_MAX_RETRIES = 2

# Upstream flags whose train_ppo_ray default would be wrong for distillation.
TSDKD_UPSTREAM_DEFAULTS = {
    "algo.kl.init_coef": 0.0,  # no reference model: the teacher is the anchor
    "algo.advantage.estimator": "reinforce",  # not used by TSD-KD; avoids upstream creating a critic
    "vllm.num_engines": 1,  # student candidates always come from vLLM
    "ckpt.path": "./ckpt/checkpoints_tsdkd",
    "ckpt.output_dir": "./ckpt/tsdkd",
    "logger.wandb.project": "openrlhf_train_tsdkd",
}


class ArgumentError(ValueError):
    """A launch argument or input file is wrong; the message names it and the fix."""


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bounded_number(kind, minimum: float, inclusive: bool):
    """argparse type for reliability flags: a finite number above a bound; the error names the bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (value >= minimum if inclusive else value > minimum) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


# Config fields that are set through another flag (so one value has one flag).
FIELDS_SET_ELSEWHERE = {"sparse_top_k": "--teacher.sparse_top_k"}


@functools.lru_cache(maxsize=None)
def config_field_docs() -> Dict[str, str]:
    """The docstring under each TSDKDConfig field (the config documents fields in place;
    argparse shows the first sentence as the flag's help)."""
    tree = ast.parse(inspect.getsource(TSDKDConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                text = " ".join(str(following.value.value).split())
                docs[node.target.id] = text.rstrip(".").replace("%", "%%")  # argparse formats help with %
    return docs


def _field_help(field: dataclasses.Field) -> str:
    return config_field_docs().get(field.name) or field.name.replace("_", " ")


def _field_type(field: dataclasses.Field):
    """argparse `type`/`choices` for a config field, from its annotation or default."""
    if field.name in CONFIG_FIELD_CHOICES:
        return str, CONFIG_FIELD_CHOICES[field.name]
    annotation = field.type
    if isinstance(annotation, str):
        annotation = typing.get_type_hints(TSDKDConfig).get(field.name, annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if inner else str
    if annotation is bool:
        return _str2bool, None
    if annotation in (int, float, str):
        return annotation, None
    default = field.default if field.default is not dataclasses.MISSING else None
    return (type(default) if default is not None else str), None


def add_tsdkd_arguments(parser: argparse.ArgumentParser) -> None:
    teacher = parser.add_argument_group("TSD-KD teacher (--teacher.*): the ranking reward model")
    teacher.add_argument("--teacher.model_name_or_path", type=str, default=None,
                         help="HF model name or local path of the teacher; must use the student's tokenizer")
    teacher.add_argument("--teacher.num_nodes", type=int, default=1, help="nodes for the teacher group")
    teacher.add_argument("--teacher.num_gpus_per_node", type=int, default=1, help="GPUs per node for the teacher group")
    teacher.add_argument("--teacher.placement", type=str, default="separate", choices=TEACHER_PLACEMENTS,
                         help="separate: own GPUs, sparse top-K transport through Ray; "
                              "colocate: loaded inside each policy actor, dense logits, no transport")
    teacher.add_argument("--teacher.sparse_top_k", type=int, default=TSDKDConfig.sparse_top_k,
                         help="K of the sparse transport: teacher top-K log-probs per token (+ one tail bucket) "
                              "(default: %(default)s)")
    teacher.add_argument("--teacher.offload", action="store_true", default=False,
                         help="offload teacher weights to CPU between forwards (DeepSpeed)")
    # Reliability (docs/reliability.md): a dead or hung teacher stops the run in bounded time.
    teacher.add_argument("--teacher.timeout_s", type=_bounded_number(float, 0, inclusive=False),
                         default=DEFAULT_TEACHER_TIMEOUT_S,
                         help="seconds one step's teacher forward may take before it is retried (default: %(default)g)")
    teacher.add_argument("--teacher.max_retries", type=_bounded_number(int, 0, inclusive=True),
                         default=DEFAULT_TEACHER_MAX_RETRIES,
                         help="retries of a failed or timed-out teacher forward before the run stops with the "
                              "latest checkpoint intact (default: %(default)s)")

    objective = parser.add_argument_group("TSD-KD objective (--tsdkd.*): see docs/objective.md")
    objective.add_argument("--tsdkd.preset", type=str, choices=tuple(PRESETS), default=None,
                           help="start from a named set of objective values: 'reference' (the authors' code: "
                                "micro-batch means, entropy over the top 90%% of tokens; the defaults) or 'paper' "
                                "(per-response means, entropy over the top 10%% of each response). A --tsdkd.* "
                                "flag given explicitly always overrides the preset")
    for field in dataclasses.fields(TSDKDConfig):
        if field.name in FIELDS_SET_ELSEWHERE:
            continue
        arg_type, choices = _field_type(field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        in_presets = "; ".join(f"--tsdkd.preset {name}: {values[field.name]}"
                               for name, values in PRESETS.items() if field.name in values)
        # default None = "not given": the preset (or the config's default) applies; see loss_config_from_args.
        switch = {"nargs": "?", "const": True} if arg_type is _str2bool else {}  # a bare --tsdkd.diagnostics is true
        objective.add_argument(f"--tsdkd.{field.name}", type=arg_type, choices=choices, default=None, **switch,
                               help=f"{_field_help(field)} (default: {default}{'; ' + in_presets if in_presets else ''})")
    objective.add_argument("--tsdkd.on_policy_fraction", type=float, default=1.0,
                           help="lambda: probability that a step trains on the student's own samples; other steps "
                                "use the dataset's reference responses from --data.label_key (GKD-style mixing). "
                                "1.0 = fully on-policy (reference)")
    objective.add_argument("--tsdkd.max_nonfinite_steps", type=_bounded_number(int, 1, inclusive=True),
                           default=DEFAULT_MAX_NONFINITE_STEPS,
                           help="micro-batches with a NaN/inf loss are skipped (logged as tsdkd/nonfinite_skipped); "
                                "this many in a row stop the run (default: %(default)s)")
    objective.add_argument("--tsdkd.dry_run", action="store_true", default=False,
                           help="validate everything, print the resolved plan (groups, GPUs, nodes) and exit")

    parser.set_defaults(**TSDKD_UPSTREAM_DEFAULTS)
    # Upstream names runs "ppo_<date>"; the tensorboard/wandb run of a TSD-KD job says what it is.
    parser.set_defaults(**{"logger.wandb.run_name": "tsdkd_%s" % datetime.now().strftime("%m%dT%H:%M")})


def loss_config_from_args(args: SimpleNamespace) -> TSDKDConfig:
    """The objective's config: --tsdkd.preset's values (if any), then every --tsdkd.* flag the user
    gave (an explicit flag always wins, even when it repeats the default), then the config's defaults."""
    given = {f.name: getattr(args.tsdkd, f.name) for f in dataclasses.fields(TSDKDConfig)
             if f.name not in FIELDS_SET_ELSEWHERE and getattr(args.tsdkd, f.name) is not None}
    values = {**(PRESETS[args.tsdkd.preset] if args.tsdkd.preset else {}), **given}
    values["sparse_top_k"] = args.teacher.sparse_top_k
    try:
        return TSDKDConfig(**values)
    except ValueError as error:
        # Name the flag the user typed, not the config field behind it.
        message = str(error)
        for name, flag in FIELDS_SET_ELSEWHERE.items():
            message = message.replace(f"TSDKDConfig.{name}", flag)
        raise ArgumentError(message.replace("TSDKDConfig.", "--tsdkd.")) from None


def ranking_group_size(args: SimpleNamespace, config: TSDKDConfig) -> int:
    """How many samples must share a micro-batch: n for sequence-level ranking, else 1."""
    return args.rollout.n_samples_per_prompt if config.sequence_level_on else 1


def tsdkd_options(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> Dict[str, Any]:
    """What every policy actor needs to build its TSD-KD trainer (all picklable)."""
    return {
        "loss_config": config,
        "shared_vocab_size": shared_vocab_size,
        "group_size": ranking_group_size(args, config),
        "colocated_teacher_path": (
            args.teacher.model_name_or_path if args.teacher.placement == "colocate" else None
        ),
    }


def teacher_signal_options(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> Dict[str, Any]:
    return {"loss_config": config, "shared_vocab_size": shared_vocab_size}
