"""Run the real command lines: one subprocess per stage, its whole output in a log file, a progress
bar on the console, a time limit, and errors that name the stage and show the log's end.

Every subprocess runs in its own session, so on a timeout, Ctrl-C or SIGTERM the child and every
process it started (Ray, vLLM) are stopped together.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 25

# Intra-op threads on CPU, fixed whatever the machine's core count, so that the same command gives
# the same weights on any machine with the same CPU kind and libraries: float sums are split by
# thread, so another count gives other roundings and, after hundreds of steps, another model.
# 2 = the cores of the machines these budgets were sized on.
TRAINING_THREADS = 2  # single-process DeepSpeed jobs (train_sft, train_dpo) and in-process evaluation
RAY_WORKER_THREADS = 1  # each process of a Ray job (trainer, policy actor with its colocated teacher, vLLM engine)


class JobError(Exception):
    """Bad input: main() prints the message (one sentence, no traceback) and exits with status 2."""

    exit_status = 2


class StageFailed(JobError):
    """A stage's command failed: the message names the stage and its log and ends with the log's
    last lines (the real error is in the child's output). Exit status 1."""

    exit_status = 1


class StageCancelled(StageFailed):
    """A stage stopped because another stage running beside it failed (that failure is the one to report)."""


def child_env(run_dir: Path, *, threads: int) -> dict[str, str]:
    """Environment of every subprocess: offline, unbuffered, no wandb, datasets cache in the run dir
    (concurrent runs then never share half-written Arrow files), `threads` OpenMP threads per
    process whatever the caller's environment says (see TRAINING_THREADS)."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_DATASETS_CACHE=str(run_dir / ".hf_datasets_cache"),
        OMP_NUM_THREADS=str(threads),
        # Never fewer threads than asked (the runtime may otherwise pick a count by itself).
        OMP_DYNAMIC="FALSE",
        MKL_DYNAMIC="FALSE",
    )
    # OpenMP threads that wait by spinning make a shared or oversubscribed CPU crawl: measured here,
    # train_sft took 4.8 s per step with spinning threads and 0.33 s with passive waiting (load ~5
    # on 2 cores). Passive waiting costs nothing measurable on an idle machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Let children import this checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def on_cpu() -> bool:
    from tsdkd_plugin.host.device import cpu_mode

    return cpu_mode()


def upstream_command(module: str, args: Sequence[str], *, ray_job: bool, threads: int = TRAINING_THREADS) -> list[str]:
    """The command line that runs an unmodified upstream OpenRLHF CLI here.

    On CPU: through tsdkd_plugin.host.cpu_launch (local Ray with logical GPUs for Ray jobs, a
    world of one for DeepSpeed ones). On GPUs: the module itself (Ray jobs) or under torchrun.
    """
    if on_cpu():
        # Ray jobs take their threads per process from OMP_NUM_THREADS (child_env).
        thread_flags = [] if ray_job else ["--threads", str(threads)]
        return [sys.executable, "-m", "tsdkd_plugin.host.cpu_launch", *thread_flags, module, *args]
    if ray_job:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", module, *args]


def tsdkd_command(args: Sequence[str]) -> list[str]:
    """train_tsdkd starts its own local Ray cluster on CPU, so it is always run directly."""
    return [sys.executable, "-m", "openrlhf.cli.train_tsdkd", *args]


class StepProgress:
    """Turns an OpenRLHF log stream into progress-bar positions.

    Two formats: the SFT/DPO trainers' tqdm bars ("Train step of epoch E: ... N/M") and the
    Ray trainers' per-rollout log line ("Global step N"). Only the display depends on this;
    a format that is not recognised leaves the bar at elapsed time.
    """

    _EPOCH_STEP = re.compile(r"Train step of epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    _GLOBAL_STEP = re.compile(r"Global step (\d+)")

    def __init__(self, total: int | None, kind: str, epochs: int = 1):
        if kind not in ("epoch_bar", "global_step"):
            raise ValueError(f"unknown progress kind {kind!r}")
        self.total, self.kind, self.epochs = total, kind, epochs
        # SFT/DPO bars count optimizer steps (micro batch = batch); Ray trainers log once per rollout.
        self.unit = "step" if kind == "epoch_bar" else "rollout"

    def position(self, line: str) -> int | None:
        if self.kind == "epoch_bar":
            match = self._EPOCH_STEP.search(line)
            if match:
                epoch, done, per_epoch = (int(x) for x in match.groups())
                self.total = per_epoch * self.epochs
                return epoch * per_epoch + done
            return None
        match = self._GLOBAL_STEP.search(line)
        return int(match.group(1)) if match else None


@dataclass
class CommandResult:
    command: list[str]
    log: str
    seconds: float
    returncode: int


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's own process group (it was started in a new session), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_logged(
    command: Sequence[str],
    log_path: Path,
    *,
    desc: str,
    progress: StepProgress | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 3600,
    verbose: bool = False,
    cancel: threading.Event | None = None,
) -> CommandResult:
    """Run one command, its whole output into log_path, a progress bar on the console.

    Raises JobError naming the stage and the log (with the log's last lines) when the command
    fails or runs past timeout_s; StageCancelled, with the child's process group stopped, once
    `cancel` is set (another stage beside it failed).
    """
    from tqdm.auto import tqdm

    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bar = tqdm(
        total=progress.total if progress else None,
        desc=desc,
        unit=progress.unit if progress else "it",
        dynamic_ncols=True,
    )
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        # A new session: on timeout the child and every process it started (Ray, vLLM) are stopped together.
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env or os.environ),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
        # A reader thread, so that a silent child cannot keep the time limit from being checked.
        chunks: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, chunks), daemon=True)
        reader.start()
        pending = b""
        timed_out = cancelled = False
        try:
            while True:
                if time.time() - started > timeout_s:
                    timed_out = True
                    _stop_process_group(process)
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    _stop_process_group(process)
                    break
                try:
                    chunk = chunks.get(timeout=1.0)
                except queue.Empty:
                    continue
                if not chunk:
                    break
                log.write(chunk)
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                # tqdm redraws with carriage returns; both end a "line" for our purpose.
                pieces = re.split(rb"[\r\n]", pending + chunk)
                pending = pieces.pop()
                if progress:
                    for piece in pieces:
                        position = progress.position(piece.decode("utf-8", "replace"))
                        if position is not None:
                            bar.total = progress.total
                            bar.n = min(position, progress.total or position)
                            bar.refresh()
        except BaseException:  # Ctrl-C, SIGTERM (see main), or a bug here: never leave the child running
            _stop_process_group(process)
            raise
        finally:
            returncode = process.wait()
            bar.close()
    seconds = time.time() - started
    if cancelled:
        raise StageCancelled(f"{desc} was stopped because a stage beside it failed; its log is {log_path}.")
    if timed_out or returncode != 0:
        why = (
            f"ran past its {timeout_s:.0f} s limit and was stopped" if timed_out else f"exited with status {returncode}"
        )
        raise StageFailed(f"{desc} {why}; its log is {log_path}.\n--- last lines of the log ---\n{log_tail(log_path)}")
    return CommandResult(list(command), str(log_path), seconds, returncode)


def _pump(stream, chunks: queue.Queue[bytes]) -> None:
    """Copy a pipe into a queue; an empty chunk marks its end."""
    for chunk in iter(lambda: stream.read1(65536), b""):
        chunks.put(chunk)
    chunks.put(b"")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    cleaned = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(cleaned[-lines:])


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 76 - len(text)), flush=True)


def require_saved_model(output_dir: Path, what: str) -> None:
    if not (output_dir / "config.json").is_file():
        raise StageFailed(f"{what} finished but saved no HF model in {output_dir} (no config.json); see its log")


def fresh_stage_dir(path: Path) -> Path:
    """A stage directory emptied of an earlier run's outputs, so a stale model can never be evaluated."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def cpu_model_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), from /proc/cpuinfo where there is one."""
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


# The phase of an invocation that builds (or loads from the cache) each regime's teacher and students
# and measures their reference accuracies: a comparison resumed on a wiped machine repeats it.
BUILD_PHASE = "building"


def hardware_kind() -> str:
    """What decides the float results of a training run besides its recipe and library versions:
    the device and, on CPU, the processor model and the instruction set torch dispatches to (the
    same recipe trained on an Intel Xeon and on an AMD EPYC, both AVX512, gave a teacher at 88.4% and
    at 80.8%: docs/reproduction.md)."""
    import torch

    if not on_cpu() and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{cpu_model_name()}:{torch.backends.cpu.get_cpu_capability()}"


def machine_info() -> dict:
    """What the numbers were measured on; the load average matters on shared machines."""
    import torch

    cpu_name = cpu_model_name()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "device": "cpu" if on_cpu() else "cuda",
        "load_average_1_5_15": list(load) if load else None,
    }


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks run: the running stage's process group is
    stopped and a half-built cache entry's temp directory is removed."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write through a temp file and a rename: a crash never leaves half a file under path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def run_entry_point(prog: str, parse, run, argv: Sequence[str] | None, *, interrupted: str = "interrupted.") -> int:
    """The `main` of every entry point: parse, run, and turn JobError into its one sentence on stderr
    and its exit status (2 for bad input, 1 for a failed stage), Ctrl-C into 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse(argv)
    options.argv = argv
    exit_on_sigterm()
    try:
        status = run(options)
    except JobError as error:
        print(f"\n{prog}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0
