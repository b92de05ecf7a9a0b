"""Atomic checkpoints and what a resume relies on (issue: reliability, item 3), without Ray:
`save_checkpoint_atomically` with a stand-in DeepSpeed engine that writes the same files
(torch.save zip archives), can be "killed" half-way, and the preflight's verdict on a
checkpoint directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tsdkd_plugin.host.checkpoint import (
    checkpoint_problem,
    fresh_checkpoint_states,
    read_latest,
    resume_hint,
    save_checkpoint_atomically,
)

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class KilledDuringSave(Exception):
    pass


class FakeEngine:
    """Writes what DeepSpeedEngine.save_checkpoint writes for one rank; `die_in` = the tag whose
    save is interrupted after a truncated optimizer file (as a SIGKILL would leave it)."""

    def __init__(self, die_in=None):
        self.die_in = die_in

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to write, atomically
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(2)}, "client_state": client_state}, tag_dir / MODEL_FILE)
        if self.die_in and tag.startswith(self.die_in):
            (tag_dir / OPTIM_FILE).write_bytes(b"PK\x03\x04 half")
            raise KilledDuringSave(tag)
        torch.save({"optimizer": {"step": 1}}, tag_dir / OPTIM_FILE)


def save(ckpt_dir, tag, engine=None, max_num=2, max_mem_gib=float("inf")):
    save_checkpoint_atomically(
        engine or FakeEngine(), str(ckpt_dir), tag, client_state={"global_step": tag}, max_num=max_num,
        max_mem_gib=max_mem_gib, is_rank_0=True, barrier=lambda: None,
        write_metric=lambda d: Path(d, "metric.json").write_text(json.dumps({"metric_value": None})),
    )  # fmt: skip


def tag_dirs(ckpt_dir):
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_dir())


def test_saves_rotate_to_max_num_and_leave_no_temporaries(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, f"global_step{step}")
    assert tag_dirs(tmp_path) == ["global_step3", "global_step4"]
    assert read_latest(str(tmp_path)) == "global_step4"
    assert (tmp_path / "global_step4" / "metric.json").exists()  # upstream's metric file inside the atomic unit
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["latest"]  # no temp file of `latest`
    assert checkpoint_problem(str(tmp_path)) is None


@pytest.mark.parametrize("max_num", [1, 2])
def test_a_kill_during_saving_keeps_the_previous_checkpoint(tmp_path, max_num):
    save(tmp_path, "global_step1", max_num=max_num)
    save(tmp_path, "global_step2", max_num=max_num)
    with pytest.raises(KilledDuringSave):
        save(tmp_path, "global_step3", engine=FakeEngine(die_in="global_step3"), max_num=max_num)
    # Upstream deletes old tags before saving: with --ckpt.max_num 1 nothing usable would be left.
    assert read_latest(str(tmp_path)) == "global_step2"
    assert "global_step3" not in tag_dirs(tmp_path) and "global_step3.partial" in tag_dirs(tmp_path)
    assert checkpoint_problem(str(tmp_path)) is None
    # The resumed run saves step 3 again: the leftover is replaced, nothing partial remains.
    save(tmp_path, "global_step3", max_num=max_num)
    assert read_latest(str(tmp_path)) == "global_step3"
    assert not any(name.endswith(".partial") for name in tag_dirs(tmp_path))
    assert len([n for n in tag_dirs(tmp_path) if n.startswith("global_step")]) == max_num


def test_a_tag_saved_again_is_replaced_whole(tmp_path):
    save(tmp_path, "global_step1")
    (tmp_path / "global_step1" / "stale_file_from_another_world_size.pt").write_bytes(b"old")
    save(tmp_path, "global_step1")
    assert sorted(os.listdir(tmp_path / "global_step1")) == sorted(["metric.json", MODEL_FILE, OPTIM_FILE])
    assert tag_dirs(tmp_path) == ["global_step1"]


def test_best_checkpoints_are_kept_apart_from_rotation(tmp_path):
    save(tmp_path, "global_step1", max_num=1)
    save(tmp_path, "best_global_step1", max_num=1)
    assert read_latest(str(tmp_path)) == "best_global_step1"  # as upstream (DeepSpeed's save_latest default)
    save(tmp_path, "global_step2", max_num=1)
    save(tmp_path, "global_step3", max_num=1)
    assert tag_dirs(tmp_path) == ["best_global_step1", "global_step3"]
    save(tmp_path, "best_global_step3", max_num=1)  # a newer best replaces the old one, once it is complete
    assert tag_dirs(tmp_path) == ["best_global_step3", "global_step3"]


def test_max_mem_evicts_oldest_but_never_latest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, f"global_step{step}", max_num=10, max_mem_gib=1e-9)
    assert tag_dirs(tmp_path) == ["global_step3"]
    assert read_latest(str(tmp_path)) == "global_step3"


# ----------------------------------------------------------------------------- what --ckpt.load_enable checks


def complete_checkpoint(ckpt_dir, *tags):
    for tag in tags:
        save(ckpt_dir, tag, max_num=10)


def test_nothing_to_resume_is_not_a_problem(tmp_path):
    assert checkpoint_problem(str(tmp_path / "absent")) is None
    (tmp_path / "_actor").mkdir()  # a run killed before its first save completed
    (tmp_path / "_actor" / "global_step1.partial").mkdir()
    assert checkpoint_problem(str(tmp_path / "_actor")) is None
    assert fresh_checkpoint_states()["global_step"] == 0


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("latest_empty", "latest is empty"),
        ("latest_names_missing_tag", "global_step9 does not exist"),
        ("truncated_model_file", f"{MODEL_FILE} is truncated or corrupt"),
        ("no_model_file", "has no DeepSpeed model states file"),
        ("latest_not_text", "cannot be read"),
    ],
)
def test_unusable_checkpoints_are_named_with_the_fix(tmp_path, damage, expected):
    ckpt = tmp_path / "_actor"
    complete_checkpoint(ckpt, "global_step1", "global_step2")
    if damage == "latest_empty":
        (ckpt / "latest").write_text("")
    elif damage == "latest_names_missing_tag":
        (ckpt / "latest").write_text("global_step9")
    elif damage == "truncated_model_file":
        data = (ckpt / "global_step2" / MODEL_FILE).read_bytes()
        (ckpt / "global_step2" / MODEL_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "no_model_file":
        (ckpt / "global_step2" / MODEL_FILE).unlink()
    elif damage == "latest_not_text":
        (ckpt / "latest").write_bytes(b"\xff\xfe\x00")
    problem = checkpoint_problem(str(ckpt))
    assert problem is not None and expected in problem, problem
    assert "global_step1" in problem and "start from step 0" in problem  # the fix: an earlier complete tag


def test_a_file_where_the_checkpoint_directory_should_be(tmp_path):
    (tmp_path / "_actor").write_text("oops")
    assert "is not a directory" in checkpoint_problem(str(tmp_path / "_actor"))


def test_resume_hint_names_the_latest_tag(tmp_path):
    assert "no checkpoint was saved" in resume_hint(str(tmp_path))
    complete_checkpoint(tmp_path / "_actor", "global_step5")
    assert "--ckpt.load_enable to resume from global_step5" in resume_hint(str(tmp_path))
