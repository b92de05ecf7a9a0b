"""One typed, frozen run configuration (host/run_config.py): every `--tsdkd.*` / `--teacher.*` flag is a
config field and lands in it unchanged; past the CLI nothing reads the flags any other way."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

from tsdkd_plugin.cli.train_tsdkd import build_parser, parse_args
from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
from tsdkd_plugin.objective import TSDKDConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--actor.model_name_or_path", "student", "--teacher.model_name_or_path", "teacher",
        "--data.prompt_dataset", "prompts.jsonl", "--data.label_key", "answer"]  # fmt: skip
CLI_ONLY_FLAGS = {"tsdkd.preset", "tsdkd.dry_run"}  # consumed by the CLI itself
# A value other than the default for every TeacherConfig and RunConfig flag.
TEACHER_VALUES = {"model_name_or_path": ("teacher-x", "teacher-x"), "placement": ("colocate", "colocate"),
                  "num_nodes": ("2", 2), "num_gpus_per_node": ("3", 3), "offload": ("true", True),
                  "timeout_s": ("12.5", 12.5), "max_retries": ("5", 5)}  # fmt: skip
RUN_VALUES = {"student_logits": ("full", "full"), "on_policy_fraction": ("0.25", 0.25),
              "max_nonfinite_steps": ("3", 3)}  # fmt: skip


def test_every_tsdkd_and_teacher_flag_is_a_config_field():
    parser, _ = build_parser()
    ours = {a.dest for a in parser._actions if a.dest.startswith(("tsdkd.", "teacher."))}
    fields = {f"teacher.{f.name}" for f in dataclasses.fields(TeacherConfig)}
    fields |= {f"tsdkd.{f.name}" for f in dataclasses.fields(RunConfig) if f.metadata.get("flag", True)}
    fields |= {f"tsdkd.{f.name}" for f in dataclasses.fields(TSDKDConfig) if f.name != "sparse_top_k"}
    fields |= {"teacher.sparse_top_k"}
    assert ours == fields | CLI_ONLY_FLAGS


def test_each_flag_lands_in_its_field():
    assert set(TEACHER_VALUES) == {f.name for f in dataclasses.fields(TeacherConfig)}
    assert set(RUN_VALUES) == {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("flag", True)}
    argv = list(BASE)
    for name, (text, _) in TEACHER_VALUES.items():
        argv += [f"--teacher.{name}", text]
    for name, (text, _) in RUN_VALUES.items():
        argv += [f"--tsdkd.{name}", text]
    _, run = parse_args(argv + ["--teacher.sparse_top_k", "7", "--tsdkd.beta", "0.5"])
    for name, (_, value) in TEACHER_VALUES.items():
        assert getattr(run.teacher, name) == value, name
    for name, (_, value) in RUN_VALUES.items():
        assert getattr(run, name) == value, name
    assert (run.objective.sparse_top_k, run.objective.beta) == (7, 0.5)


def test_defaults_and_derived_group_size():
    _, run = parse_args(BASE)
    assert run.teacher == TeacherConfig("teacher") and run.objective == TSDKDConfig()
    assert (run.student_logits, run.on_policy_fraction, run.ranking_group_size) == ("fused", 1.0, 1)
    ranked = ["--tsdkd.indirect_level", "both", "--rollout.n_samples_per_prompt", "4",
              "--rollout.micro_batch_size", "4", "--train.micro_batch_size", "4"]  # fmt: skip
    assert parse_args(BASE + ranked)[1].ranking_group_size == 4


def test_the_run_config_is_frozen_and_travels_to_ray_actors():
    _, run = parse_args(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.teacher.timeout_s = 1.0
    assert pickle.loads(pickle.dumps(run)) == run


def test_a_colocated_teacher_ignores_the_group_sizes():
    """Shared command lines pass --teacher.num_gpus_per_node with either placement."""
    assert TeacherConfig("t", placement="colocate", num_gpus_per_node=0).has_own_group is False
    with pytest.raises(ValueError, match="--teacher.num_gpus_per_node must be >= 1, got 0"):
        TeacherConfig("t", num_gpus_per_node=0)


# Modules whose code runs past the CLI (in the driver's trainer actor, the policy and teacher actors).
PAST_THE_CLI = ["tsdkd_plugin/host/actor.py", "tsdkd_plugin/host/trainer.py", "tsdkd_plugin/host/launch.py",
                "tsdkd_plugin/host/experience.py", "tsdkd_plugin/host/student_step.py",
                "tsdkd_plugin/host/single_process.py", *sorted(
                    str(p.relative_to(ROOT)) for p in (ROOT / "tsdkd_plugin/host/teachers").glob("*.py"))]


def reads_past_the_cli(tree: ast.AST) -> list[str]:
    """`<...>args.tsdkd`, `<...>args.teacher`, and getattr(<...>args..., ...)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("tsdkd", "teacher"):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "args") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "args"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args:
            if "args" in ast.unparse(node.args[0]).split("."):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_past_the_cli_reads_the_flags_except_through_the_run_config():
    bad = ast.parse("x = self.args.tsdkd.beta\ny = getattr(strategy.args.teacher, 'offload', False)\nz = args.teacher")
    assert len(reads_past_the_cli(bad)) == 4  # the scan sees them (so its silence below means something)
    assert len(PAST_THE_CLI) >= 10
    found = {path: reads_past_the_cli(ast.parse((ROOT / path).read_text())) for path in PAST_THE_CLI}
    assert not any(found.values()), found
