"""Bad launches are refused before any Ray worker starts, with one sentence that names
the option or file and the fix (issue: TSD-KD inside OpenRLHF, bad input)."""

from __future__ import annotations

import json
import shutil

import pytest

from tsdkd_plugin.cli.train_tsdkd import main
from tsdkd_plugin.objective import TSDKDConfig


@pytest.fixture
def launch_argv(toy_student_dir, toy_teacher_dir, arith_data_dir):
    def build(*extra, student=None, teacher=None, prompts=None):
        argv = [
            "--actor.model_name_or_path", str(student or toy_student_dir),
            "--teacher.model_name_or_path", str(teacher or toy_teacher_dir),
            "--data.prompt_dataset", str(prompts or arith_data_dir / "prompts_train.jsonl"),
            "--data.input_key", "prompt", "--data.label_key", "answer", "--data.apply_chat_template",
            "--rollout.n_samples_per_prompt", "4", "--rollout.micro_batch_size", "4",
            "--train.micro_batch_size", "4", "--data.max_len", "256", "--tsdkd.dry_run",
        ]
        return argv + list(extra)

    return build


def refused(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one error line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_dry_run_prints_the_plan(launch_argv, capsys):
    main(launch_argv("--tsdkd.indirect_level", "both"))
    out = capsys.readouterr().out  # libraries may log to stdout before the plan
    plan = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)
    default_k = TSDKDConfig().sparse_top_k  # --teacher.sparse_top_k defaults to the config's K
    assert plan["teacher"]["transport"] == f"sparse top-{default_k}" and plan["shared_vocab_size"] == 400
    assert plan["gpus"] == {"actor": 8, "teacher": 1, "vllm": 1, "total": 10}  # upstream: 8 GPUs per node


def test_missing_teacher_option(launch_argv, capsys):
    argv = launch_argv()
    at = argv.index("--teacher.model_name_or_path")
    del argv[at : at + 2]
    assert "--teacher.model_name_or_path is required" in refused(argv, capsys)


def test_teacher_path_that_does_not_exist(launch_argv, tmp_path, capsys):
    line = refused(launch_argv(teacher=tmp_path / "no-such-teacher"), capsys)
    assert "--teacher.model_name_or_path" in line and "does not exist" in line


def test_teacher_with_another_tokenizer(launch_argv, toy_teacher_dir, qwen_vocab_tokenizer_dir, tmp_path, capsys):
    other = tmp_path / "qwen-vocab-teacher"
    shutil.copytree(qwen_vocab_tokenizer_dir, other)
    shutil.copy(toy_teacher_dir / "config.json", other / "config.json")
    line = refused(launch_argv(teacher=other), capsys)
    assert "--teacher.model_name_or_path" in line and "same tokenizer" in line


def test_sequence_ranking_needs_several_samples(launch_argv, capsys):
    argv = launch_argv("--tsdkd.indirect_level", "sequence", "--rollout.n_samples_per_prompt", "1")
    assert "--rollout.n_samples_per_prompt >= 2" in refused(argv, capsys)


def test_groups_must_fit_micro_batches(launch_argv, capsys):
    argv = launch_argv("--tsdkd.indirect_level", "both", "--train.micro_batch_size", "6")
    assert "--train.micro_batch_size (6) must be a multiple of --rollout.n_samples_per_prompt (4)" in refused(argv, capsys)


def test_dataset_without_input_key(launch_argv, capsys):
    line = refused(launch_argv("--data.input_key", "question"), capsys)
    assert "no key 'question' (--data.input_key)" in line and "'prompt'" in line


def test_dataset_with_a_broken_line(launch_argv, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    line = refused(launch_argv(prompts=broken), capsys)
    assert "line 2 is not valid JSON" in line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tsdkd.beta", "1.5"], "--tsdkd.beta must be in [0, 1]"),
        (["--tsdkd.opener_fraction", "0"], "--tsdkd.opener_fraction must be in (0, 1]"),
        (["--tsdkd.entropy_weight", "-1"], "--tsdkd.entropy_weight must be a finite real >= 0"),
        (["--teacher.sparse_top_k", "0"], "--teacher.sparse_top_k must be an integer >= 1"),
        (["--tsdkd.gate", "sharp"], "--tsdkd.gate must be one of ('soft', 'hard', 'none'), got 'sharp'"),
        (["--tsdkd.on_policy_fraction", "2"], "--tsdkd.on_policy_fraction must be in [0, 1]"),
        (["--vllm.num_engines", "0"], "--vllm.num_engines must be >= 1"),
        (["--ds.lora.rank", "8", "--ds.tensor_parallel_size", "2"], "with --ds.tensor_parallel_size > 1 is not supported"),
        (["--ds.lora.rank", "8", "--ds.load_in_4bit"], "(QLoRA) is not supported by TSD-KD"),
        (["--ds.lora.rank", "-8"], "--ds.lora.rank must be >= 0"),
        (["--ds.lora.rank", "8", "--ds.lora.alpha", "0"], "--ds.lora.alpha must be > 0"),
        (["--ds.lora.rank", "8", "--ds.lora.dropout", "1"], "--ds.lora.dropout must be in [0, 1)"),
    ],
)
def test_out_of_range_options(launch_argv, capsys, flags, expected):
    assert expected in refused(launch_argv(*flags), capsys)


def test_more_gpus_than_the_cluster_has(launch_argv):
    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight import check_cluster_capacity

    args, _ = parse_args(launch_argv("--actor.num_gpus_per_node", "4"))
    with pytest.raises(ArgumentError, match=r"needs 6 GPUs .*--actor.num_nodes x --actor.num_gpus_per_node.* has 2"):
        check_cluster_capacity(args, 2)
