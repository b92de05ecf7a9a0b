"""Bad inputs are refused before any Ray worker starts, with one sentence that names the input
and the fix (issue: reliability, item 1). One test per row of the table in docs/reliability.md;
the rows already covered by tests/cli/test_preflight.py are listed there and not repeated.

Every launch here ends in `--tsdkd.dry_run`, so an input that slipped through would print the
plan and exit 0 instead of 2 — the test would fail, nothing would start."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tsdkd_plugin.cli.train_tsdkd import main


@pytest.fixture
def launch(toy_student_dir, toy_teacher_dir, arith_data_dir):
    def build(*extra, student=None, teacher=None, prompts=None):
        return [
            "--actor.model_name_or_path", str(student or toy_student_dir),
            "--teacher.model_name_or_path", str(teacher or toy_teacher_dir),
            "--data.prompt_dataset", str(prompts or arith_data_dir / "prompts_train.jsonl"),
            "--data.input_key", "prompt", "--data.label_key", "answer", "--data.apply_chat_template",
            "--data.max_len", "96", "--rollout.max_new_tokens", "16",
            "--rollout.n_samples_per_prompt", "4", "--rollout.micro_batch_size", "4", "--train.micro_batch_size", "4",
            "--tsdkd.dry_run", *extra,
        ]  # fmt: skip

    return build


def refused(argv, capsys) -> str:
    """The CLI must exit 2 with exactly one error line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, exit_info.value.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD = {"prompt": [{"role": "user", "content": "Q: 1+1=?"}], "answer": "2"}


def test_the_baseline_launch_is_accepted(launch, capsys):
    main(launch())
    assert '"shared_vocab_size": 400' in capsys.readouterr().out


# ----------------------------------------------------------------------------- datasets


def test_dataset_file_missing(launch, tmp_path, capsys):
    line = refused(launch(prompts=tmp_path / "absent.jsonl"), capsys)
    assert "absent.jsonl" in line and "does not exist" in line


def test_dataset_file_empty(launch, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert "has no rows" in refused(launch(prompts=empty), capsys)


def test_dataset_not_utf8(launch, tmp_path, capsys):
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(json.dumps({"prompt": "x", "answer": "y"}).encode() + b"\n\xe9\xff\n")
    assert "is not UTF-8 text" in refused(launch(prompts=binary), capsys)


def test_json_array_file_not_valid(launch, tmp_path, capsys):
    broken = tmp_path / "prompts.json"
    broken.write_text('[{"prompt": "a", "answer": "b"},\n {"prompt": ]')
    assert "is not valid JSON (line 2" in refused(launch(prompts=broken), capsys)


def test_every_row_is_checked_and_bad_rows_are_counted(launch, tmp_path, capsys):
    rows = [GOOD] * 40 + [{"question": "no prompt key", "answer": "1"}, {"prompt": "   ", "answer": "1"},
                          {"prompt": 7, "answer": "1"}, '{"prompt": [', GOOD]
    line = refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "has 4 unusable row(s) of 45" in line, line
    assert "line 41 has no key 'prompt' (--data.input_key)" in line and "line 42 has an empty prompt" in line
    assert "line 43 has a prompt of type int" in line and "..." in line and "fix or remove them" in line


def test_empty_chat_prompts(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": [], "answer": "1"}, {"prompt": [{"role": "user", "content": ""}], "answer": "1"}]
    line = refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "line 2 has an empty message list" in line and "line 3 has an empty prompt" in line


def test_malformed_chat_message(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": [{"text": "hi"}], "answer": "1"}]
    assert "line 2 has message 0 that is not a" in refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)


def test_rows_without_the_label(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": "Q: 2+2=?"}]
    line = refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "line 2 has no value for 'answer' (--data.label_key)" in line


def test_text_and_chat_prompts_mixed(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": "Q: 2+2=?", "answer": "4"}]
    line = refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "mixes text prompts (line 2) and chat-message lists (line 1)" in line


def test_chat_prompts_without_the_chat_template_flag(launch, capsys):
    argv = launch()
    argv.remove("--data.apply_chat_template")
    assert "add the flag" in refused(argv, capsys) and "--data.apply_chat_template" in refused(argv, capsys)


def test_prompt_longer_than_max_len_allows(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": [{"role": "user", "content": "Q: " + "12+" * 60 + "1=?"}], "answer": "1"}]
    line = refused(launch(prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "has 1 prompt(s) longer than the 80 tokens that --data.max_len 96 leaves" in line, line
    assert "line 2 has" in line and "raise --data.max_len to at least" in line


def test_rows_past_max_samples_are_not_used(launch, tmp_path, capsys):
    """Only the first --data.max_samples rows reach training: a bad row after them is not an error."""
    rows = [GOOD] * 3 + [{"prompt": "", "answer": "1"}]
    argv = launch("--data.max_samples", "3", "--actor.num_gpus_per_node", "1", "--train.batch_size", "12",
                  prompts=write_rows(tmp_path / "p.jsonl", rows))  # 3 prompts x 4 samples fill one step
    main(argv)
    assert '"shared_vocab_size"' in capsys.readouterr().out


def test_hub_dataset_that_cannot_be_read(launch, capsys):
    line = refused(launch(prompts="no-such-org/no-such-dataset"), capsys)
    assert "'no-such-org/no-such-dataset' cannot be read" in line and "--data.prompt_split" in line


def test_prompt_probs_do_not_match_the_datasets(launch, capsys):
    assert "--data.prompt_probs has 2 value(s) for 1 dataset(s)" in refused(launch("--data.prompt_probs", "0.5,0.5"), capsys)


def test_input_template_that_cannot_format(launch, tmp_path, capsys):
    rows = [{"prompt": "Q: 1+1=?", "answer": "2"}]
    argv = launch("--data.input_template", "Question {q}: {}", prompts=write_rows(tmp_path / "p.jsonl", rows))
    argv.remove("--data.apply_chat_template")
    assert "--data.input_template" in refused(argv, capsys)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--data.max_len", "16"], "--data.max_len (16) leaves no room for a prompt after --rollout.max_new_tokens (16)"),
        (["--rollout.temperature", "0.001"], "--rollout.temperature must be 0 (greedy) or >= 0.01"),
        (["--rollout.temperature", "-1"], "--rollout.temperature must be 0 (greedy) or >= 0.01"),
        (["--ckpt.save_steps", "0"], "--ckpt.save_steps must be >= 1 (save every N steps) or -1"),
        (["--ckpt.save_steps", "1", "--ckpt.max_num", "0"], "--ckpt.max_num must be >= 1"),
        (["--teacher.timeout_s", "0"], "argument --teacher.timeout_s: must be > 0, got 0"),
        (["--teacher.max_retries", "-1"], "argument --teacher.max_retries: must be >= 0, got -1"),
        (["--tsdkd.max_nonfinite_steps", "0"], "argument --tsdkd.max_nonfinite_steps: must be >= 1, got 0"),
    ],
)
def test_contradictory_or_out_of_range_flags(launch, capsys, flags, expected):
    assert expected in refused(launch(*flags), capsys)


# ----------------------------------------------------------------------------- models


def test_model_with_fewer_logit_rows_than_its_tokenizer(launch, toy_student_dir, tmp_path, capsys):
    shrunk = tmp_path / "student-300-rows"
    shutil.copytree(toy_student_dir, shrunk)
    config = json.loads((shrunk / "config.json").read_text())
    (shrunk / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    line = refused(launch(student=shrunk), capsys)
    assert "--actor.model_name_or_path" in line and "has 300 logit rows but its tokenizer has 400 tokens" in line


def test_model_directory_without_config(launch, toy_teacher_dir, tmp_path, capsys):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    shutil.copy(toy_teacher_dir / "model.safetensors", bare)
    assert "has no config.json" in refused(launch(teacher=bare), capsys)


def test_chat_template_flag_with_a_tokenizer_without_template(launch, toy_student_dir, toy_teacher_dir, tmp_path, capsys):
    plain = {}
    for name, source in (("student", toy_student_dir), ("teacher", toy_teacher_dir)):
        plain[name] = tmp_path / f"{name}-no-template"
        shutil.copytree(source, plain[name], ignore=shutil.ignore_patterns("chat_template.jinja"))
    line = refused(launch(student=plain["student"], teacher=plain["teacher"]), capsys)
    assert "--data.apply_chat_template is set but the tokenizer of --actor.model_name_or_path" in line
    assert "has no chat template" in line


def test_hub_model_that_cannot_be_loaded(launch, capsys):
    line = refused(launch(teacher="no-such-org/no-such-model"), capsys)
    assert "--teacher.model_name_or_path 'no-such-org/no-such-model' cannot be loaded" in line


# ----------------------------------------------------------------------------- checkpoints (--ckpt.load_enable)


def fake_checkpoint(actor_dir, tag, truncate=False):
    tag_dir = actor_dir / tag
    tag_dir.mkdir(parents=True)
    torch.save({"module": {}}, tag_dir / "mp_rank_00_model_states.pt")
    if truncate:
        data = (tag_dir / "mp_rank_00_model_states.pt").read_bytes()
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(data[:40])
    (actor_dir / "latest").write_text(tag)


def test_corrupt_checkpoint_with_load_enable(launch, tmp_path, capsys):
    fake_checkpoint(tmp_path / "ckpt" / "_actor", "global_step1")
    fake_checkpoint(tmp_path / "ckpt" / "_actor", "global_step2", truncate=True)
    line = refused(launch("--ckpt.load_enable", "--ckpt.path", str(tmp_path / "ckpt")), capsys)
    assert line.startswith("python -m openrlhf.cli.train_tsdkd: error: --ckpt.load_enable: the checkpoint")
    assert "global_step2/mp_rank_00_model_states.pt is truncated or corrupt" in line
    assert "(global_step1)" in line  # the fix names the earlier complete checkpoint


def test_checkpoint_path_that_is_a_file(launch, tmp_path, capsys):
    (tmp_path / "ckpt").write_text("not a directory")
    line = refused(launch("--ckpt.load_enable", "--ckpt.path", str(tmp_path / "ckpt")), capsys)
    assert "--ckpt.path" in line and "is a file" in line


def test_load_enable_without_a_checkpoint_starts_fresh(launch, tmp_path, capsys):
    (tmp_path / "ckpt" / "_actor" / "global_step1.partial").mkdir(parents=True)  # killed during the first save
    main(launch("--ckpt.load_enable", "--ckpt.path", str(tmp_path / "ckpt")))
    assert '"shared_vocab_size"' in capsys.readouterr().out
