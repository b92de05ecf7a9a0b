"""`--teacher.*` and `--tsdkd.*` argument groups, TSD-KD defaults for upstream flags, and the one
function that turns the parsed flags into the typed run configuration (`run_config_from_args`).

Every option is a field of a config class (`host/run_config.py`: `TSDKDConfig` for the objective,
`TeacherConfig`, `RunConfig`), and its flag is generated from that field: the name, the type, the
default and the help text (the field's docstring). So the CLI cannot drift from the configs, and
argparse only turns text into typed values; whether a value is valid is decided by the config
class it lands in (docs/host_integration.md, "Where each option is checked").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import typing
from datetime import datetime
from types import SimpleNamespace

from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
from tsdkd_plugin.objective import PRESETS, TSDKDConfig
from tsdkd_plugin.objective.config import GATE_KINDS, INDIRECT_LEVELS, LISTMLE_FORMS, REDUCTIONS, TERM_BALANCES

# TSDKDConfig's names are plain `str` fields checked against these tuples (its module is torch-only).
OBJECTIVE_CHOICES = {
    "gate": GATE_KINDS,
    "indirect_level": INDIRECT_LEVELS,
    "listmle_form": LISTMLE_FORMS,
    "direct_reduction": REDUCTIONS,
    "entropy_reduction": REDUCTIONS,
    "term_balance": TERM_BALANCES,
}

# Upstream flags whose train_ppo_ray default would be wrong for distillation.
TSDKD_UPSTREAM_DEFAULTS = {
    "algo.kl.init_coef": 0.0,  # no reference model: the teacher is the anchor
    "algo.advantage.estimator": "reinforce",  # not used by TSD-KD; avoids upstream creating a critic
    "vllm.num_engines": 1,  # student candidates always come from vLLM
    "ckpt.path": "./ckpt/checkpoints_tsdkd",
    "ckpt.output_dir": "./ckpt/tsdkd",
    "logger.wandb.project": "openrlhf_train_tsdkd",
}

# Objective fields whose flag is in the teacher's group (so one value has one flag).
OBJECTIVE_FIELDS_UNDER_TEACHER = ("sparse_top_k",)


class ArgumentError(ValueError):
    """A launch argument or input file is wrong; the message names it and the fix."""


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@functools.cache
def field_docs(config_class: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (fields are documented in place;
    argparse shows it as the flag's help)."""
    tree = ast.parse(inspect.getsource(config_class))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                text = " ".join(str(following.value.value).split())
                docs[node.target.id] = text.rstrip(".").replace("%", "%%")  # argparse formats help with %
    return docs


def _field_type(config_class: type, field: dataclasses.Field) -> tuple[typing.Callable, tuple | None]:
    """(argparse `type`, the values a name may take or None) of a config field, from its annotation."""
    if config_class is TSDKDConfig and field.name in OBJECTIVE_CHOICES:
        return str, OBJECTIVE_CHOICES[field.name]
    annotation = typing.get_type_hints(config_class)[field.name]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if annotation is bool:
        return _str2bool, None
    if annotation in (int, float, str):
        return annotation, None
    raise TypeError(f"{config_class.__name__}.{field.name}: no flag type for {annotation!r}")


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _add_field_flag(group, config_class: type, field: dataclasses.Field, flag: str, *, default, note: str = ""):
    """One flag for one config field. Choices are listed in the help (the config checks them)."""
    arg_type, choices = _field_type(config_class, field)
    shown_default = _field_default(field)
    extra = {"metavar": "{" + ",".join(choices) + "}"} if choices else {}
    if arg_type is _str2bool:
        extra.update(nargs="?", const=True, metavar="{true,false}")  # a bare --teacher.offload is true
    help_text = field_docs(config_class).get(field.name) or field.name.replace("_", " ")
    group.add_argument(
        flag, type=arg_type, default=default, **extra, help=f"{help_text} (default: {shown_default}{note})"
    )


def add_tsdkd_arguments(parser: argparse.ArgumentParser) -> None:
    teacher = parser.add_argument_group("TSD-KD teacher (--teacher.*): the ranking reward model")
    for field in dataclasses.fields(TeacherConfig):
        _add_field_flag(teacher, TeacherConfig, field, f"--teacher.{field.name}", default=_field_default(field))
    for field in dataclasses.fields(TSDKDConfig):
        if field.name in OBJECTIVE_FIELDS_UNDER_TEACHER:
            _add_field_flag(teacher, TSDKDConfig, field, f"--teacher.{field.name}", default=_field_default(field))

    objective = parser.add_argument_group("TSD-KD objective (--tsdkd.*): see docs/objective.md")
    objective.add_argument(
        "--tsdkd.preset",
        type=str,
        default=None,
        metavar="{" + ",".join(PRESETS) + "}",
        help="start from a named set of objective values: 'reference' (the authors' code: "
        "micro-batch means, entropy over the top 90%% of tokens; the defaults) or 'paper' "
        "(per-response means, entropy over the top 10%% of each response). A --tsdkd.* "
        "flag given explicitly always overrides the preset",
    )
    for field in dataclasses.fields(TSDKDConfig):
        if field.name in OBJECTIVE_FIELDS_UNDER_TEACHER:
            continue
        in_presets = "; ".join(
            f"--tsdkd.preset {name}: {values[field.name]}" for name, values in PRESETS.items() if field.name in values
        )
        # default None = "not given": the preset (or the config's default) applies; see objective_from_args.
        _add_field_flag(
            objective,
            TSDKDConfig,
            field,
            f"--tsdkd.{field.name}",
            default=None,
            note=f"; {in_presets}" if in_presets else "",
        )
    for field in dataclasses.fields(RunConfig):
        if field.metadata.get("flag", True):
            _add_field_flag(objective, RunConfig, field, f"--tsdkd.{field.name}", default=_field_default(field))
    objective.add_argument(
        "--tsdkd.dry_run",
        action="store_true",
        default=False,
        help="validate everything, print the resolved plan (groups, GPUs, nodes) and exit",
    )

    parser.set_defaults(**TSDKD_UPSTREAM_DEFAULTS)
    # Upstream names runs "ppo_<date>"; the tensorboard/wandb run of a TSD-KD job says what it is.
    parser.set_defaults(**{"logger.wandb.run_name": f"tsdkd_{datetime.now():%m%dT%H:%M}"})


def objective_from_args(args: SimpleNamespace) -> TSDKDConfig:
    """The objective's config: --tsdkd.preset's values (if any), then every --tsdkd.* flag the user
    gave (an explicit flag always wins, even when it repeats the default), then the config's defaults."""
    preset = args.tsdkd.preset
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--tsdkd.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    given = {
        f.name: getattr(args.tsdkd, f.name)
        for f in dataclasses.fields(TSDKDConfig)
        if f.name not in OBJECTIVE_FIELDS_UNDER_TEACHER and getattr(args.tsdkd, f.name) is not None
    }
    values = {**(PRESETS[preset] if preset else {}), **given}
    for name in OBJECTIVE_FIELDS_UNDER_TEACHER:
        values[name] = getattr(args.teacher, name)
    return TSDKDConfig(**values)


def _flag_named(message: str) -> str:
    """TSDKDConfig's messages name its fields; the user typed flags."""
    for name in OBJECTIVE_FIELDS_UNDER_TEACHER:
        message = message.replace(f"TSDKDConfig.{name}", f"--teacher.{name}")
    return message.replace("TSDKDConfig.", "--tsdkd.")


def run_config_from_args(args: SimpleNamespace) -> RunConfig:
    """The typed run configuration from the parsed (hierarchical) flags; every value is checked by the
    config class it lands in. Raises ArgumentError naming the flag."""
    try:
        objective = objective_from_args(args)
        teacher = TeacherConfig(**{f.name: getattr(args.teacher, f.name) for f in dataclasses.fields(TeacherConfig)})
        flags = {
            f.name: getattr(args.tsdkd, f.name) for f in dataclasses.fields(RunConfig) if f.metadata.get("flag", True)
        }
        # A prompt's n samples are ranked against each other, so they must share a micro-batch.
        group_size = args.rollout.n_samples_per_prompt if objective.sequence_level_on else 1
        return RunConfig(objective=objective, teacher=teacher, ranking_group_size=group_size, **flags)
    except ValueError as error:
        raise ArgumentError(_flag_named(str(error))) from None
