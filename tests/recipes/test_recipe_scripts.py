"""Every launch recipe parses against the real argument parser, follows the reference setup,
places its groups as its header says, and fails fast on a bad environment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsdkd_plugin.recipes_tools.recipe_check import (
    DPO_MODULE,
    PPO_MODULE,
    TSDKD_MODULE,
    RecipeError,
    parse_command,
    parse_recipe,
    recipe_command,
    reference_setup_deviations,
    resolved_plan,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
PAIRS = ("qwen2.5-14b_to_1.5b", "gemma2-9b_to_2b", "qwen3-8b_to_1.7b")
LAYOUTS = ("1node", "1node-colocate", "2nodes")
REFERENCE = "qwen2.5-14b_to_1.5b.1node.sh"


def run_recipe(script: Path, env: dict, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- the set of recipes


def test_every_pair_has_single_node_multi_node_and_colocated_recipes(recipe_paths):
    names = {path.name for path in recipe_paths}
    expected = {f"{pair}.{layout}.sh" for pair in PAIRS for layout in LAYOUTS}
    assert expected <= names, sorted(expected - names)
    assert {"grpo.1node.sh", "dpo.1node.sh"} <= names
    # Small-GPU variants where memory needs them: ZeRO-3 + Adam offload, and a LoRA student.
    assert {"gemma2-9b_to_2b.1node-24gb.sh", "qwen2.5-14b_to_1.5b.1node-24gb-lora.sh"} <= names


def test_lora_recipe_declares_its_learning_rate_and_nothing_else(parsed_recipes):
    from tsdkd_plugin.recipes_tools.recipe_check import declared_deviations

    parsed = parsed_recipes["qwen2.5-14b_to_1.5b.1node-24gb-lora.sh"]
    args = parsed.args
    assert args.ds.lora.rank == 64 and args.ds.lora.alpha == 128 and args.ds.zero_stage == 3
    assert set(declared_deviations(parsed.command.script)) == {"actor.adam.lr"}
    assert args.actor.adam.lr == 1e-4
    # the same data, rollouts and objective as the reference recipe
    reference = parsed_recipes[REFERENCE]
    for dotted in ("rollout.max_new_tokens", "data.max_len", "train.batch_size", "train.num_episodes"):
        group, attr = dotted.split(".")
        assert getattr(getattr(args, group), attr) == getattr(getattr(reference.args, group), attr), dotted
    assert parsed.config.objective == reference.config.objective


def test_every_recipe_parses_against_its_real_parser(parsed_recipes):
    modules = {name: parsed.command.module for name, parsed in parsed_recipes.items()}
    assert modules["grpo.1node.sh"] == PPO_MODULE and modules["dpo.1node.sh"] == DPO_MODULE
    assert all(module == TSDKD_MODULE for name, module in modules.items() if not name.startswith(("grpo", "dpo")))
    for name, parsed in parsed_recipes.items():
        if parsed.command.module == TSDKD_MODULE:
            assert parsed.config is not None, name  # the objective's config was built from --tsdkd.*


def test_tsdkd_recipes_follow_the_reference_setup(parsed_recipes):
    for name, parsed in parsed_recipes.items():
        assert reference_setup_deviations(parsed) == [], name
        if parsed.command.module != TSDKD_MODULE:
            continue
        args = parsed.args
        assert args.train.max_epochs == 1, f"{name}: one update per rollout keeps training on-policy"
        assert args.actor.adam.betas == [0.9, 0.999], name
        assert args.rollout.n_samples_per_prompt == 1 and args.tsdkd.on_policy_fraction == 1.0, name
        objective = parsed.config.objective
        assert (objective.beta, objective.temperature, objective.gate) == (0.9, 1.0, "soft"), name
        assert args.data.apply_chat_template and args.data.input_key == "prompt", name
        assert args.ckpt.save_hf, f"{name}: evaluation reads HF checkpoints"


@pytest.mark.parametrize("pair", PAIRS)
def test_plans_place_groups_as_the_headers_say(parsed_recipes, pair):
    single = resolved_plan(TSDKD_MODULE, parsed_recipes[f"{pair}.1node.sh"].args, parsed_recipes[f"{pair}.1node.sh"].config)
    assert single["gpus"] == {"actor": 4, "teacher": 2, "vllm": 2, "total": 8}
    assert single["teacher"]["placement"] == "separate" and single["teacher"]["transport"] == "sparse top-64"

    colocated = parsed_recipes[f"{pair}.1node-colocate.sh"]
    plan = resolved_plan(TSDKD_MODULE, colocated.args, colocated.config)
    assert plan["gpus"]["total"] == 8 and plan["teacher"]["placement"] == "colocate"
    assert plan["vllm"]["colocated_with_policy"] and colocated.args.ds.zero_stage == 3
    assert colocated.args.vllm.enable_sleep and colocated.args.ds.enable_sleep

    multi = parsed_recipes[f"{pair}.2nodes.sh"]
    plan = resolved_plan(TSDKD_MODULE, multi.args, multi.config)
    assert plan["gpus"]["total"] == 16
    # Each group fits on one 8-GPU node, so the policy's gradient traffic stays inside a node.
    assert plan["policy"]["gpus_per_node"] == 8 and plan["policy"]["nodes"] == 1
    assert plan["gpus"]["teacher"] + plan["gpus"]["vllm"] == 8


def test_effective_batch_is_128_on_every_layout(parsed_recipes):
    for name, parsed in parsed_recipes.items():
        args = parsed.args
        if parsed.command.module == DPO_MODULE:
            processes = parsed.command.deepspeed_gpus
            micro = args.train.micro_batch_size
        else:
            processes = args.actor.num_nodes * args.actor.num_gpus_per_node
            micro = args.train.micro_batch_size
        assert args.train.batch_size == 128, name
        assert args.train.batch_size % (processes * micro) == 0, f"{name}: 128 is not a whole number of micro-steps"


def test_baselines_share_prompts_and_budget_with_tsdkd(parsed_recipes):
    reference, grpo, dpo = (parsed_recipes[name].args for name in (REFERENCE, "grpo.1node.sh", "dpo.1node.sh"))
    assert grpo.algo.advantage.estimator == "group_norm" and grpo.rollout.n_samples_per_prompt == 8
    assert grpo.algo.kl.use_loss and grpo.algo.kl.estimator == "k3"
    assert grpo.reward.remote_url == [str(RECIPES / "rewards" / "math_verifier.py")]
    assert grpo.data.label_key == "label" and grpo.data.apply_chat_template
    # Same responses per optimizer step, sampling temperature and generation length as TSD-KD.
    assert grpo.rollout.batch_size * grpo.rollout.n_samples_per_prompt == reference.rollout.batch_size
    assert grpo.rollout.temperature == reference.rollout.temperature
    assert grpo.rollout.max_new_tokens == reference.rollout.max_new_tokens
    # Same total responses: 3 episodes x N prompts for TSD-KD = max_samples x 8 for GRPO (N = 80k).
    assert grpo.data.max_samples * 8 == 3 * 80_000
    assert (dpo.data.prompt_key, dpo.data.chosen_key, dpo.data.rejected_key) == ("prompt", "chosen", "rejected")
    assert dpo.data.apply_chat_template and dpo.train.max_epochs == 3
    assert dpo.model.model_name_or_path == dpo.ref.model_name_or_path == reference.actor.model_name_or_path


# --------------------------------------------------------------------------- resuming a killed run


def test_every_training_recipe_resumes_from_its_own_checkpoints(parsed_recipes, tmp_path):
    """A rerun of a recipe continues its run: --ckpt.load_enable, checkpoints saved on a schedule
    and kept in twos or more, under OUTPUT_DIR at a path that depends on nothing but OUTPUT_DIR
    (so the rerun finds them), apart from the final model, and never shared by two recipes."""
    paths = {}
    for name, parsed in parsed_recipes.items():
        ckpt = parsed.args.ckpt
        assert ckpt.load_enable, f"{name}: a rerun would start over (no --ckpt.load_enable)"
        assert ckpt.save_steps > 0 and ckpt.max_num >= 2, f"{name}: nothing to resume from, or one save to lose"
        assert Path(ckpt.path).is_absolute() and Path(ckpt.path) != Path(ckpt.output_dir), name
        paths[name] = ckpt.path
    assert len(set(paths.values())) == len(paths), f"two recipes share a checkpoint directory: {paths}"

    for path in RECIPES.rglob("*.sh"):
        if path.name not in parsed_recipes:
            continue
        env = {"RAY_HEAD_ADDRESS": "h", "SHARED_DIR": "/shared", "OUTPUT_DIR": str(tmp_path / "run")}
        command = recipe_command(path, env=env)
        assert command.flag_value("--ckpt.path") == str(tmp_path / "run" / "checkpoints"), path.name
        assert recipe_command(path, env=env).argv == command.argv, f"{path.name}: not the same command twice"


def test_the_recipe_says_whether_it_resumes(tmp_path):
    """What a recipe prints before submitting (recipes/lib/common.sh, report_resume_point)."""
    def report(module: str) -> str:
        script = (f'source "{RECIPES}/lib/common.sh"; RECIPE_ARGS=(--ckpt.path "{tmp_path}" --ckpt.load_enable); '
                  f"report_resume_point {module}")
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return result.stderr.strip()

    assert "no checkpoint in" in report(TSDKD_MODULE) and "starting at step 0" in report(TSDKD_MODULE)
    (tmp_path / "_actor").mkdir()
    (tmp_path / "_actor" / "latest").write_text("global_step400")
    assert f"resuming from global_step400 in {tmp_path / '_actor'}" in report(TSDKD_MODULE)
    (tmp_path / "latest").write_text("global_step7")  # train_dpo keeps its tags at the top level
    assert f"resuming from global_step7 in {tmp_path}" in report(DPO_MODULE)


# --------------------------------------------------------------------------- overrides (toy scale)


def test_overrides_are_appended_last_and_switches_can_be_dropped(clean_env):
    grpo = RECIPES / "baselines" / "grpo.1node.sh"
    env = {"TSDKD_RECIPE_EXTRA_ARGS": "--actor.num_gpus_per_node 1 --vllm.num_engines 1",
           "TSDKD_RECIPE_DROP_FLAGS": "--vllm.enable_sleep --ds.enable_sleep --no.such.switch"}
    command = recipe_command(grpo, env=env)
    assert list(command.argv[-4:]) == ["--actor.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    assert "--vllm.enable_sleep" not in command.argv and "--ds.enable_sleep" not in command.argv
    args, _, _ = parse_command(command.module, command.argv)
    assert args.actor.num_gpus_per_node == 1 and args.vllm.num_engines == 1 and not args.vllm.enable_sleep
    assert args.ref.num_gpus_per_node == 8  # untouched

    # An option that takes a value cannot be dropped (its value would be left behind).
    result = run_recipe(grpo, dict(clean_env, TSDKD_RECIPE_PRINT_ARGS="1", TSDKD_RECIPE_DROP_FLAGS="--ds.zero_stage"))
    assert result.returncode == 2
    assert "TSDKD_RECIPE_DROP_FLAGS names --ds.zero_stage, which takes a value" in error_line(result)


@pytest.mark.parametrize("script, toy, gpus", [
    ("tsdkd/qwen2.5-14b_to_1.5b.1node.sh", "tsdkd", 3), ("tsdkd/qwen2.5-14b_to_1.5b.2nodes.sh", "tsdkd_2nodes", 4),
    ("baselines/grpo.1node.sh", "grpo", 1), ("baselines/dpo.1node.sh", "dpo", 1),
])
def test_toy_scale_overrides_pass_the_real_parsers(script, toy, gpus):
    """The overrides the Ray-cluster test runs (tsdkd_plugin.testing), checked in seconds."""
    from tsdkd_plugin.testing import TOY_DROP_FLAGS, TOY_RECIPE_ARGS

    env = {"TSDKD_RECIPE_EXTRA_ARGS": TOY_RECIPE_ARGS[toy], "TSDKD_RECIPE_DROP_FLAGS": TOY_DROP_FLAGS,
           "RAY_HEAD_ADDRESS": "127.0.0.1", "SHARED_DIR": "/shared", "NUM_GPUS": "1"}
    command = recipe_command(RECIPES / script, env=env)
    args, config, _ = parse_command(command.module, command.argv, where=script)
    plan = resolved_plan(command.module, args, config, command.deepspeed_gpus)
    assert plan["gpus"]["total"] == gpus, plan["gpus"]
    if toy == "grpo":
        assert not args.vllm.enable_sleep and not args.ds.enable_sleep


# --------------------------------------------------------------------------- stale flags cannot land


def test_stale_or_misspelled_flags_are_rejected(parsed_recipes):
    reference = parsed_recipes[REFERENCE].command
    with pytest.raises(RecipeError, match="--pretrain"):  # pre-0.10 flat flag
        parse_command(TSDKD_MODULE, [*reference.argv, "--pretrain", "x"])
    with pytest.raises(RecipeError, match="--tsdkd.betta"):
        parse_command(TSDKD_MODULE, [*reference.argv, "--tsdkd.betta", "0.5"])
    with pytest.raises(RecipeError, match="beta"):  # a value the objective's config refuses
        parse_command(TSDKD_MODULE, [*reference.argv, "--tsdkd.beta", "1.5"])
    grpo = parsed_recipes["grpo.1node.sh"].command
    with pytest.raises(RecipeError, match="--n_samples_per_prompt"):
        parse_command(PPO_MODULE, [*grpo.argv, "--n_samples_per_prompt", "8"])
    with pytest.raises(RecipeError, match="n_samples_per_prompt > 1"):  # upstream's own validation
        parse_command(PPO_MODULE, [*grpo.argv, "--rollout.n_samples_per_prompt", "1"])
    dpo = parsed_recipes["dpo.1node.sh"].command
    with pytest.raises(RecipeError, match="--actor.model_name_or_path"):  # train_dpo has no --actor.*
        parse_command(DPO_MODULE, [*dpo.argv, "--actor.model_name_or_path", "x"])


def test_a_recipe_with_a_stale_flag_fails_the_check(tmp_path):
    script = tmp_path / "stale.sh"
    script.write_text(
        f'source "{RECIPES}/lib/common.sh"\n'
        "launch_ray_job openrlhf.cli.train_tsdkd --actor.model_name_or_path a --teacher.model_name_or_path b "
        "--data.prompt_dataset p.jsonl --n_samples_per_prompt 4\n"
    )
    with pytest.raises(RecipeError, match=r"stale\.sh.*--n_samples_per_prompt"):
        parse_recipe(script)


# --------------------------------------------------------------------------- dry run and print modes


def test_print_args_mode_contacts_nothing_and_uses_absolute_paths(clean_env):
    command = recipe_command(RECIPES / "tsdkd" / REFERENCE, env={"RAY_DASHBOARD_PORT": "1"})
    assert command.launcher == "ray-job" and command.module == TSDKD_MODULE
    assert Path(command.flag_value("--data.prompt_dataset")).is_absolute()
    assert Path(command.flag_value("--ckpt.output_dir")).is_absolute()


def test_dry_run_command_prints_the_resolved_plan(parsed_recipes, capsys):
    """What TSDKD_RECIPE_DRY_RUN=1 execs (recipes/lib/common.sh), in-process: quick."""
    from tsdkd_plugin.recipes_tools.recipe_check import main

    command = parsed_recipes["qwen3-8b_to_1.7b.2nodes.sh"].command
    assert main(["--plan", "--module", command.module, "--", *command.argv]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == {"actor": 8, "teacher": 4, "vllm": 4, "total": 16}
    dpo = parsed_recipes["dpo.1node.sh"].command
    assert main(["--plan", "--module", dpo.module, "--deepspeed-gpus", "8", "--", *dpo.argv]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == {"total": 8}
    assert main(["--plan", "--module", command.module, "--", *command.argv, "--tsdkd.gate", "sharp"]) == 2
    assert "gate" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_prints_the_resolved_plan_without_launching(clean_env):
    env = dict(clean_env, TSDKD_RECIPE_DRY_RUN="1", PYTHON=sys.executable,
               RAY_HEAD_ADDRESS="ray-head.example", SHARED_DIR="/shared/tsdkd")
    result = run_recipe(RECIPES / "tsdkd" / "qwen2.5-14b_to_1.5b.2nodes.sh", env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert plan["entry_point"] == TSDKD_MODULE
    assert plan["gpus"] == {"actor": 8, "teacher": 4, "vllm": 4, "total": 16}
    assert plan["policy"]["nodes"] == 1 and plan["teacher"]["nodes"] == 1


# --------------------------------------------------------------------------- bad environment


@pytest.mark.parametrize("missing", ["RAY_HEAD_ADDRESS", "SHARED_DIR"])
def test_multi_node_recipe_names_a_missing_required_variable(clean_env, missing):
    env = dict(clean_env, RAY_HEAD_ADDRESS="ray-head.example", SHARED_DIR="/shared/tsdkd")
    del env[missing]
    started = time.monotonic()
    result = run_recipe(RECIPES / "tsdkd" / "gemma2-9b_to_2b.2nodes.sh", env)
    assert result.returncode == 2 and time.monotonic() - started < 5
    assert f"environment variable {missing} is not set" in error_line(result)


def test_unreachable_ray_head_stops_within_the_probe_timeout(clean_env, free_port):
    env = dict(clean_env, RAY_HEAD_ADDRESS="127.0.0.1", RAY_DASHBOARD_PORT=str(free_port), RAY_PROBE_TIMEOUT="2")
    started = time.monotonic()
    result = run_recipe(RECIPES / "tsdkd" / "qwen3-8b_to_1.7b.1node.sh", env)
    assert result.returncode == 2 and time.monotonic() - started < 5
    message = error_line(result)
    assert f"127.0.0.1:{free_port}" in message and "RAY_HEAD_ADDRESS" in message and "ray_up.sh head" in message


def test_missing_local_model_directory_is_named(clean_env, tmp_path):
    env = dict(clean_env, STUDENT_MODEL=str(tmp_path / "no-such-model"))
    result = run_recipe(RECIPES / "baselines" / "grpo.1node.sh", env)
    assert result.returncode == 2 and "STUDENT_MODEL=" in error_line(result)


def test_ray_worker_start_needs_the_head_address(clean_env):
    result = run_recipe(RECIPES / "cluster" / "ray_up.sh", clean_env)
    assert result.returncode == 2 and "usage" in error_line(result)
    result = subprocess.run(["bash", str(RECIPES / "cluster" / "ray_up.sh"), "worker"], env=clean_env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "RAY_HEAD_ADDRESS is not set" in error_line(result)


def test_recipe_check_cli_reports_every_recipe(capsys, parsed_recipes):
    from tsdkd_plugin.recipes_tools.recipe_check import main

    # Parsers are cached in-process by the session fixture, so this is quick.
    assert main(["--example-env", str(RECIPES / "tsdkd" / REFERENCE), str(RECIPES / "baselines" / "dpo.1node.sh")]) == 0
    out = capsys.readouterr().out
    assert out.count("OK   ") == 2 and "actor 4, teacher 2, vllm 2, total 8" in out
