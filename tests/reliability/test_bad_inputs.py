"""Bad inputs are refused before any Ray worker starts, with one sentence that names the input
and the fix (issue: reliability, item 1). One test per row of the table in docs/reliability.md;
the rows already covered by tests/cli/test_preflight.py are listed there and not repeated.

Every launch here ends in `--tsdkd.dry_run`, so an input that slipped through would print the
plan and exit 0 instead of 2 — the test would fail, nothing would start."""

from __future__ import annotations

import json
import os
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
        (["--teacher.timeout_s", "0"], "--teacher.timeout_s must be a finite number of seconds > 0, got 0.0"),
        (["--teacher.timeout_s", "inf"], "--teacher.timeout_s must be a finite number of seconds > 0, got inf"),
        (["--teacher.max_retries", "-1"], "--teacher.max_retries must be an integer >= 0, got -1"),
        (["--tsdkd.max_nonfinite_steps", "0"], "--tsdkd.max_nonfinite_steps must be an integer >= 1, got 0"),
        (["--teacher.num_gpus_per_node", "0"], "--teacher.num_gpus_per_node must be >= 1, got 0"),
        (["--teacher.placement", "remote"], "--teacher.placement must be one of separate, colocate, got 'remote'"),
        (["--tsdkd.student_logits", "chunked"], "--tsdkd.student_logits must be one of fused, full, got 'chunked'"),
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


# ============================================================================= issue 16: every flag, checked before Ray
# One change at a time to the baseline launch, as a careless user would make it; each is refused in the
# preflight with one sentence naming the flag (and file) and what would be valid (docs/reliability.md §1).


@pytest.mark.parametrize(
    "flags, expected",
    [
        # OpenRLHF's own numeric flags (upstream: ZeroDivisionError, DeepSpeed's or vLLM's assertion in a worker)
        (["--rollout.micro_batch_size", "0"], "--rollout.micro_batch_size must be >= 1, got 0"),
        (["--ds.tensor_parallel_size", "0"], "--ds.tensor_parallel_size must be >= 1, got 0"),
        (["--train.batch_size", "6"], "--train.batch_size (6) must be a multiple of --train.micro_batch_size (4) x 8"),
        (["--rollout.top_p", "0"], "--rollout.top_p must be in (0, 1], got 0.0"),
        (["--rollout.batch_size", "1", "--rollout.n_samples_per_prompt", "4"], "fewer than the 8 policy ranks"),
        (["--vllm.tensor_parallel_size", "0"], "--vllm.tensor_parallel_size must be >= 1"),
        (["--vllm.gpu_memory_utilization", "1.5"], "--vllm.gpu_memory_utilization must be in (0, 1]"),
        (["--train.seed", "-1"], "--train.seed must be in [0, 4294967295], got -1"),
        (["--ds.zero_stage", "4"], "--ds.zero_stage must be in [0, 3], got 4"),
        (["--actor.adam.lr", "0"], "--actor.adam.lr must be > 0"),
        (["--actor.adam.betas", "0.9", "1.5"], "--actor.adam.betas values must each be in [0, 1), got 0.9 1.5"),
        (["--actor.lr_warmup_ratio", "2"], "--actor.lr_warmup_ratio must be in [0, 1]"),
        (["--train.num_episodes", "0"], "--train.num_episodes must be >= 1"),
        (["--train.max_epochs", "0"], "--train.max_epochs must be >= 1"),
        (["--logger.logging_steps", "0"], "--logger.logging_steps must be >= 1"),
        (["--eval.steps", "0"], "--eval.steps must be >= 1 (evaluate every N steps) or -1"),
        (["--ckpt.max_mem", "0"], "--ckpt.max_mem must be > 0"),
        (["--train.enable_ema", "--train.ema_beta", "1"], "--train.ema_beta must be in (0, 1)"),
        (["--teacher.num_gpus_per_node", "0"], "--teacher.num_gpus_per_node must be >= 1"),
        (["--rollout.temperature", "nan"], "--rollout.temperature must be 0 (greedy) or >= 0.01, got nan"),
        (["--train.colocate_all", "--vllm.num_engines", "2"], "--vllm.num_engines x --vllm.tensor_parallel_size (2) must equal"),
        (["--rollout.vllm_generate_batch_size", "2048"], "--rollout.vllm_generate_batch_size (2048) > --rollout.batch_size"),
        # names checked against the library that reads them
        (["--actor.lr_scheduler", "cosin"], "--actor.lr_scheduler 'cosin' is not a transformers scheduler"),
        (["--ds.attn_implementation", "sdpa2"], "--ds.attn_implementation 'sdpa2' is not an attention implementation"),
        (["--ds.grad_accum_dtype", "fp8"], "--ds.grad_accum_dtype 'fp8' is not a DeepSpeed dtype"),
        # upstream features and options that TSD-KD does not use: refused instead of silently ignored
        (["--train.async_enable"], "--train.async_enable is not supported by TSD-KD"),
        (["--ds.ring_attn_size", "2"], "--ds.ring_attn_size 2 needs --ds.packing_samples"),
        (["--ds.load_in_4bit"], "--ds.load_in_4bit quantizes the student"),
        (["--data.max_images_per_prompt", "1"], "(vision-language prompts) is not supported by TSD-KD"),
        (["--algo.advantage.estimator", "gae"], "--algo.advantage.estimator gae is not for TSD-KD"),
        (["--algo.kl.init_coef", "0.01"], "--algo.kl.init_coef 0.01 is not for TSD-KD"),
        (["--actor.entropy_coef", "0.01"], "--actor.entropy_coef 0.01 is not for TSD-KD: TSD-KD's entropy term is --tsdkd.entropy_weight"),
        (["--critic.freezing_steps", "5"], "--critic.freezing_steps 5 is not for TSD-KD"),
        (["--reward.model_name_or_path", "some/rm"], "a verifier reward comes from --reward.remote_url"),
        # --tsdkd.* settings that would train nothing
        (["--tsdkd.num_candidates", "1"], "--tsdkd.num_candidates 1: the token-level ranking orders the student's k"),
        (["--tsdkd.direct_weight", "0", "--tsdkd.entropy_weight", "0", "--tsdkd.indirect_weight", "0"],
         "every term of the TSD-KD loss is off"),
        # data flags
        (["--data.max_samples", "0"], "--data.max_samples must be >= 1, got 0"),
        (["--data.prompt_probs", "0.5"], "--data.prompt_probs '0.5' must be probabilities in [0, 1] that sum to 1"),
        (["--data.prompt_probs", "abc"], "--data.prompt_probs 'abc' must be comma-separated numbers"),
        (["--eval.dataset", "x.jsonl"], "--eval.dataset scores its samples with a verifier"),
        # packages a flag needs
        (["--ds.use_liger_kernel"], None),  # refused only where liger-kernel is not installed
    ],
)
def test_flags_are_checked_before_anything_starts(launch, capsys, flags, expected):
    import importlib.util

    if expected is None:
        if importlib.util.find_spec("liger_kernel") is not None:
            pytest.skip("liger-kernel is installed here")
        expected = "--ds.use_liger_kernel needs the Python package 'liger-kernel'"
    line = refused(launch(*flags), capsys)
    assert expected in line, line


def test_all_linear_typed_on_the_command_line_reaches_peft_as_its_shorthand(launch):
    """nargs="*" makes `--ds.lora.target_modules all-linear` the list ["all-linear"], which PEFT takes
    for a module name and fails on in the policy actor; the CLI passes PEFT the string."""
    from tsdkd_plugin.cli.train_tsdkd import parse_args

    args, _ = parse_args(launch("--ds.lora.rank", "8", "--ds.lora.target_modules", "all-linear"))
    assert args.ds.lora.target_modules == "all-linear"
    args, _ = parse_args(launch("--ds.lora.rank", "8", "--ds.lora.target_modules", "q_proj", "v_proj"))
    assert args.ds.lora.target_modules == ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- model directories broken beyond "missing"


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _shard_index(model_dir, shards):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))


MODEL_DAMAGE = {
    "truncated_safetensors": (lambda d: _truncate(d / "model.safetensors"),
                              "model.safetensors is truncated: "),
    "config_without_weights": (lambda d: (d / "model.safetensors").unlink(),
                               "has a config.json but no weights"),
    "more_layers_than_weights": (lambda d: _edit_config(d, num_hidden_layers=8, layer_types=["full_attention"] * 8),
                                 "config.json declares 8 layers (num_hidden_layers) but model.safetensors holds weights for 4"),
    "config_not_an_object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             "config.json holds a JSON list, not an object"),
    "config_not_json": (lambda d: (d / "config.json").write_text('{"model_type": "qwen2",'),
                        "config.json is not valid JSON"),
    "truncated_tokenizer_json": (lambda d: _truncate(d / "tokenizer.json"),
                                 "tokenizer.json is not valid JSON"),
    "no_tokenizer": (lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith("tokenizer")],
                     "has no tokenizer (tokenizer.json"),
    "vocab_size_not_the_weights": (lambda d: _edit_config(d, vocab_size=600),
                                   "config.json says vocab_size 600 but model.embed_tokens.weight in model.safetensors has 512 rows"),
    "hidden_size_not_the_weights": (lambda d: _edit_config(d, hidden_size=64),
                                    "config.json says hidden_size 64 but model.embed_tokens.weight"),
    "index_names_a_missing_shard": (lambda d: _shard_index(d, {"lm_head.weight": "model-00002-of-00002.safetensors"}),
                                    "maps tensors to 1 shard(s) that are not there (model-00002-of-00002.safetensors)"),
    "index_and_shard_disagree": (lambda d: _shard_index(d, {"model.norm.weight": "model.safetensors",
                                                           "lm_head.bias": "model.safetensors"}),
                                 "model.safetensors lacks 1 tensor(s) that model.safetensors.index.json places there"),
    "broken_generation_config": (lambda d: (d / "generation_config.json").write_text("{"),
                                 "generation_config.json is not valid JSON"),
    "unknown_model_type": (lambda d: _edit_config(d, model_type="no-such-type"),
                           "cannot be loaded (ValueError"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_model_directories_are_checked_for_real(launch, toy_teacher_dir, tmp_path, capsys, damage):
    """The teacher copied and damaged one way; the sentence names the flag, the directory and the file."""
    broken = tmp_path / f"teacher-{damage}"
    shutil.copytree(toy_teacher_dir, broken)
    make_damage, expected = MODEL_DAMAGE[damage]
    make_damage(broken)
    line = refused(launch(teacher=broken), capsys)
    assert f"--teacher.model_name_or_path {str(broken)!r}" in line and expected in line, line


# ----------------------------------------------------------------------------- ranges that depend on the models


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tsdkd.num_candidates", "500"], "--tsdkd.num_candidates (500) must be <= the 400 tokens of the shared vocabulary"),
        (["--teacher.sparse_top_k", "401"], "--teacher.sparse_top_k (401) must be <= the 400 tokens of the shared vocabulary"),
        (["--data.max_len", "4096"], "--data.max_len (4096) exceeds the position limit of --actor.model_name_or_path"),
        (["--vllm.tensor_parallel_size", "2", "--vllm.num_engines", "1"], "--vllm.tensor_parallel_size (2) must divide the 1 attention heads"),
        (["--ds.lora.rank", "8", "--ds.lora.target_modules", "q_prj"], "--ds.lora.target_modules q_prj names no module of --actor.model_name_or_path"),
    ],
)
def test_ranges_that_depend_on_the_models(launch, capsys, flags, expected):
    line = refused(launch(*flags), capsys)
    assert expected in line, line


# ----------------------------------------------------------------------------- data options


def test_a_split_a_local_file_does_not_have(launch, capsys):
    line = refused(launch("--data.prompt_split", "test"), capsys)
    assert "--data.prompt_split 'test'" in line and "whose only split is 'train'" in line


def test_a_dataset_smaller_than_one_optimizer_step(launch, tmp_path, capsys):
    line = refused(launch("--data.max_samples", "8"), capsys)  # 8 prompts x 4 samples < --train.batch_size 128
    assert "gives 8 prompt(s)" in line and "fewer than --train.batch_size 128: no optimizer step would run" in line


def test_reference_responses_must_be_text_for_off_policy_steps(launch, tmp_path, capsys):
    rows = [GOOD, {"prompt": [{"role": "user", "content": "Q: 2+2=?"}], "answer": 4}]
    line = refused(launch("--tsdkd.on_policy_fraction", "0.5", prompts=write_rows(tmp_path / "p.jsonl", rows)), capsys)
    assert "line 2 has a 'answer' (--data.label_key) of type int, which is not a reference response" in line


def test_the_evaluation_dataset_is_checked_like_the_prompts(launch, tmp_path, capsys):
    reward = tmp_path / "reward.py"
    reward.write_text("def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n")
    line = refused(launch("--reward.remote_url", str(reward), "--eval.dataset", str(tmp_path / "eval.jsonl")), capsys)
    assert line.endswith(f"--eval.dataset {str(tmp_path / 'eval.jsonl')!r} does not exist; check the path")


# ----------------------------------------------------------------------------- paths and scripts


def test_checkpoint_path_that_is_a_file_with_saving_on(launch, tmp_path, capsys):
    (tmp_path / "ckpt").write_text("not a directory")
    line = refused(launch("--ckpt.save_steps", "1", "--ckpt.path", str(tmp_path / "ckpt")), capsys)
    assert f"--ckpt.path {str(tmp_path / 'ckpt')!r} is a file, not a checkpoint directory" in line


@pytest.mark.parametrize("flag", ["--ckpt.output_dir", "--ckpt.path", "--logger.tensorboard_dir"])
def test_output_directories_that_cannot_be_created(launch, tmp_path, capsys, flag):
    """Found now, not at the first save or, for --ckpt.output_dir, after the whole run (the final save)."""
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "out"
    line = refused(launch(flag, str(target), "--ckpt.save_steps", "1"), capsys)
    assert f"{flag} {str(target)!r} cannot be created: {tmp_path / 'a-file'} is a file" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_an_output_directory_without_write_permission(launch, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = refused(launch("--ckpt.output_dir", str(locked / "model")), capsys)
    finally:
        locked.chmod(0o755)
    assert f"--ckpt.output_dir {str(locked / 'model')!r} is not writable" in line


def test_a_valid_launch_leaves_nothing_behind(launch, tmp_path, capsys):
    """The probes are made and removed; the run's directories are created by the run, not the preflight."""
    main(launch("--ckpt.save_steps", "1", "--ckpt.path", str(tmp_path / "ckpt"),
                "--ckpt.output_dir", str(tmp_path / "model"), "--logger.tensorboard_dir", str(tmp_path / "tb")))
    assert '"shared_vocab_size": 400' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "script, flag, expected",
    [
        (None, "--reward.remote_url", "does not exist; point it at a Python file that defines reward_func"),
        ("def reward(q, p, l):\n    return q\n", "--reward.remote_url", "does not define reward_func(queries, prompts, labels)"),
        ("def reward_func(q, p, l)\n", "--reward.remote_url", "has a syntax error (line 1"),
        (None, "--train.agent_func_path", "does not exist; point it at a Python file that defines class AgentExecutor"),
    ],
)
def test_reward_and_agent_scripts(launch, tmp_path, capsys, script, flag, expected):
    path = tmp_path / "script.py"
    if script is not None:
        path.write_text(script)
    line = refused(launch(flag, str(path)), capsys)
    assert f"{flag} {str(path)!r}" in line and expected in line, line


def test_a_reward_url_without_a_scheme(launch, capsys):
    line = refused(launch("--reward.remote_url", "localhost:5000/get_reward"), capsys)
    assert "--reward.remote_url 'localhost:5000/get_reward' is neither an http(s):// URL" in line


# ----------------------------------------------------------------------------- checkpoints on resume


def test_a_checkpoint_that_is_not_deepspeeds(launch, tmp_path, capsys):
    """A valid archive without DeepSpeed's 'module' entry (upstream: KeyError: 'module' in the policy actor)."""
    tag_dir = tmp_path / "ckpt" / "_actor" / "global_step1"
    tag_dir.mkdir(parents=True)
    torch.save({"state_dict": {}}, tag_dir / "mp_rank_00_model_states.pt")
    (tmp_path / "ckpt" / "_actor" / "latest").write_text("global_step1")
    line = refused(launch("--ckpt.load_enable", "--ckpt.path", str(tmp_path / "ckpt")), capsys)
    assert "mp_rank_00_model_states.pt is not a DeepSpeed model-states file (it has no 'module' entry)" in line


@pytest.mark.parametrize(
    "files, flags, expected",
    [
        ({"mp_rank_00_model_states.pt": {"module": {"model.model.embed_tokens.weight": torch.zeros(10, 3)}}}, [],
         "was saved from another model (model.embed_tokens.weight is [10, 3] there, [448, 64] in --actor.model_name_or_path"),
        ({"mp_rank_00_model_states.pt": {"module": {}}, "zero_pp_rank_0_mp_rank_00_optim_states.pt": {},
          "zero_pp_rank_1_mp_rank_00_optim_states.pt": {}}, [],
         "was saved by 2 data-parallel rank(s), this launch has 8"),
        ({"mp_rank_00_model_states.pt": {"module": {}}}, ["--ds.zero_stage", "3"],
         "was saved with --ds.zero_stage 0, 1 or 2, this launch uses --ds.zero_stage 3"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_launch(launch, tmp_path, capsys, files, flags, expected):
    tag_dir = tmp_path / "ckpt" / "_actor" / "global_step1"
    tag_dir.mkdir(parents=True)
    for name, content in files.items():
        torch.save(content, tag_dir / name)
    (tmp_path / "ckpt" / "_actor" / "latest").write_text("global_step1")
    line = refused(launch("--ckpt.load_enable", "--ckpt.path", str(tmp_path / "ckpt"), *flags), capsys)
    assert line.startswith("python -m openrlhf.cli.train_tsdkd: error: --ckpt.load_enable: ") and expected in line, line
