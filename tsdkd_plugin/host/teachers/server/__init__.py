"""A teacher behind an inference server: TSD-KD's teacher signals from a vLLM OpenAI-compatible
endpoint that someone else runs (`--teacher.remote_url`), instead of a Ray group in the job.

    settings.py      the server(s), the served model, bounds (one frozen object)
    client.py        HTTP: bounded pool, per-request timeout, retries with backoff, failure kinds
    signals.py       prompt log-probs -> the Ray teacher's sparse signals (exact, or bounded approximations)
    checks.py        before any rollout: served model name, context length, tokenizer, log-prob limit
    teacher.py       ServerTeacher: micro-batches -> wire dicts; a failure stops the run in one sentence;
                     ServerDriverTeacher: the DriverTeacher of a run with --teacher.remote_url
    local_server.py  the `vllm serve` flags it needs; a loopback server for tests and benchmarks

docs/server_teacher.md describes the server's flags, the approximations and their bounds.
"""

from tsdkd_plugin.host.run_config import parse_server_urls
from tsdkd_plugin.host.teachers.server.settings import ServerTeacherSettings
from tsdkd_plugin.host.teachers.server.teacher import (
    ServerDriverTeacher,
    ServerTeacher,
    ServerTeacherFailedError,
    ServerTeacherUnavailableError,
)

__all__ = [
    "ServerDriverTeacher",
    "ServerTeacher",
    "ServerTeacherFailedError",
    "ServerTeacherSettings",
    "ServerTeacherUnavailableError",
    "parse_server_urls",
]
