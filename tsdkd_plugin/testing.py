"""Helpers for end-to-end checks of Ray jobs on CPU, shared by the test suite and benchmarks.

They live in the package (not in tests/) because OpenRLHF's wheel owns the top-level
name `tests`, so test modules cannot import each other unambiguously.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence


def run_child(cmd: Sequence[str], env: Dict[str, str], log_file: Path, timeout: float) -> int:
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


def tensorboard_scalars(tb_dir: Path) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} over every TensorBoard event file under tb_dir, oldest first, so a
    resumed run's new file overrides the steps it repeats."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(Path(tb_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not event_files:
        raise FileNotFoundError(f"no TensorBoard event file under {tb_dir}")
    scalars: Dict[str, Dict[int, float]] = {}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return scalars


def tree_digest(path: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under path (bytecode caches left out), so two trees
    compare byte for byte and a failed comparison shows which files differ."""
    import hashlib

    path = Path(path)
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def probe_token_ids(tokenizer) -> List[int]:
    """A fixed chat exchange, tokenized: the sequence whose log-probs are compared."""
    messages = [{"role": "user", "content": "Q: 12+7=?"}, {"role": "assistant", "content": "12+7=19. #### 19"}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def hf_prompt_logprobs(model_dir, token_ids: Sequence[int]) -> List[float]:
    """log p(token_i | tokens_<i), i >= 1, under the HF model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)])).logits[0, :-1].float()
    targets = torch.tensor(list(token_ids)[1:]).unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()


def engine_prompt_logprobs(engine, token_ids: Sequence[int]) -> List[float]:
    """The same quantity from a live OpenRLHF vLLM rollout engine (a RolloutRayActor handle)."""
    import ray
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    output = ray.get(engine.generate.remote(prompt_token_ids=list(token_ids), sampling_params=params))
    return [position[token].logprob for position, token in zip(output.prompt_logprobs[1:], list(token_ids)[1:])]


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b))


def free_ports(count: int) -> List[int]:
    """`count` distinct loopback ports with nothing listening (bound together, then released)."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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

    def __init__(self, repo_root: Path, gpus_per_node: Sequence[int], cpus_per_node: int = 8,
                 base_env: Dict[str, str] | None = None, start_timeout: float = 240):
        import tempfile
        import uuid

        from tsdkd_plugin.host.device import cpu_mode_env

        self.repo_root = Path(repo_root)
        self.ray_up = self.repo_root / "recipes" / "cluster" / "ray_up.sh"
        # Ray's socket paths must stay short: a private directory right under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="tsdkd_rc_", dir="/tmp")
        self.marker_value = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.env = {**(base_env if base_env is not None else os.environ), **cpu_mode_env(threads_per_process=1),
                    self.MARKER: self.marker_value, "RAY_HEAD_ADDRESS": "127.0.0.1",
                    "RAY_GCS_PORT": str(self.gcs_port), "RAY_DASHBOARD_PORT": str(self.dashboard_port),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.logs: List[Path] = []
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
            "--num-cpus", str(cpus), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
            "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
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


def ray_job_actor_nodes(address: str, submission_id: str) -> Dict[str, List[str]]:
    """{actor class name: [node id of each actor]} of a Ray job, running or finished, from Ray's
    state API on the job server at `address` (dead actors stay listed after the job ends)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
    nodes: Dict[str, List[str]] = {}
    for actor in list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10_000,
                             raise_on_missing_output=False):
        nodes.setdefault(actor.class_name, []).append(actor.node_id)
    return nodes


# Toy-scale overrides of the recipes (TSDKD_RECIPE_EXTRA_ARGS; docs/recipes.md, "Toy scale"): the
# toy teacher and student on CPU (fp32, PyTorch attention, no CUDA graphs), one logical GPU per
# group (two for the two-node recipe's policy, which then needs two rollout micro-batches), 8
# prompts (GRPO: 4 x 4 samples), 2 optimizer steps, a checkpoint every step.
TOY_CPU_ARGS = "--ds.param_dtype fp32 --ds.attn_implementation sdpa --vllm.enforce_eager"
TOY_RECIPE_ARGS: Dict[str, str] = {
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
TOY_RECIPE_ARGS["tsdkd_2nodes"] = (TOY_RECIPE_ARGS["tsdkd"] + " --actor.num_gpus_per_node 2 "
                                   "--rollout.micro_batch_size 2 --train.micro_batch_size 2")
# Switches the toy runs remove (TSDKD_RECIPE_DROP_FLAGS): vLLM-CPU has no sleep mode.
TOY_DROP_FLAGS = "--vllm.enable_sleep --ds.enable_sleep"
