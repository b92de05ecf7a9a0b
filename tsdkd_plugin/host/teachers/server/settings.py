"""What the server teacher needs to know about its server(s): one frozen, validated object.

Made from the run configuration (`ServerTeacherSettings.of_run`: `--teacher.remote_url`,
`--teacher.model_name_or_path`, `--teacher.remote_top_k`, `--teacher.remote_concurrency`,
`--teacher.timeout_s`, `--teacher.max_retries`, all checked by `TeacherConfig`/`RunConfig`); the
preflight's server check, the HTTP client and the driver-side teacher read this object.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from tsdkd_plugin.host.run_config import RunConfig, parse_server_urls

DEFAULT_CONCURRENCY = 16
DEFAULT_BACKOFF_S = 1.0
DEFAULT_BACKOFF_CAP_S = 30.0
# vLLM's prompt log-probs are the model's raw distribution: no temperature is applied to prompt
# tokens (vllm/config/model.py, `logprobs_mode`), so the server teacher serves tau = 1 only.
SERVER_TEMPERATURE = 1.0
# A server started with `vllm serve --api-key KEY` wants "Authorization: Bearer KEY"; the key is read
# from this environment variable at launch (never a flag: command lines end up in logs).
API_KEY_ENV = "TSDKD_TEACHER_API_KEY"


@dataclass(frozen=True)
class ServerTeacherSettings:
    """A teacher served by vLLM's OpenAI-compatible server(s), as the launch flags set it."""

    urls: tuple[str, ...]
    """Base URLs of the servers (`--teacher.remote_url`, comma-separated); requests go round-robin
    and a retried request moves on to the next server."""
    model: str
    """The served model name (`--teacher.model_name_or_path`): the `model` of every request, one of
    the server's /v1/models ids (vllm serve --served-model-name, else the path it was started from)."""
    request_top_k: int
    """Log-probs per position asked of the server (vLLM's `prompt_logprobs`); the server must be
    started with `--max-logprobs` at least this. >= the K shipped to the actors (`sparse_top_k`):
    more makes the entropy and the order of the student's candidates exact for more positions."""
    concurrency: int = DEFAULT_CONCURRENCY
    """Requests in flight at once, over all servers (one request scores one sample)."""
    timeout_s: float = 600.0
    """Seconds one request may take before it counts as failed (and is retried)."""
    max_retries: int = 2
    """Retries of one request after a failure that can pass (refused or reset connection, timeout,
    HTTP 5xx / 408 / 429); then the run stops. A refusal (other 4xx) or a malformed answer stops it
    at once."""
    backoff_s: float = DEFAULT_BACKOFF_S
    """Pause before the first retry; it doubles with each further retry, up to `backoff_cap_s`."""
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    extra_headers: tuple[tuple[str, str], ...] = field(default=())
    """HTTP headers sent with every request (e.g. an Authorization header for `vllm serve --api-key`)."""

    def __post_init__(self) -> None:
        if not self.urls or any(not isinstance(u, str) or not u for u in self.urls):
            raise ValueError("ServerTeacherSettings.urls must name at least one server")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("ServerTeacherSettings.model must be the served model name")
        for name, low in (("request_top_k", 1), ("concurrency", 1), ("max_retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ServerTeacherSettings.{name} must be an integer >= {low}, got {value!r}")
        for name in ("timeout_s", "backoff_s", "backoff_cap_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ServerTeacherSettings.{name} must be a finite number >= 0, got {value!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"ServerTeacherSettings.timeout_s must be > 0, got {self.timeout_s!r}")

    @classmethod
    def of_run(cls, run: RunConfig) -> ServerTeacherSettings:
        """The settings of a run with --teacher.remote_url (an API key from $TSDKD_TEACHER_API_KEY)."""
        teacher = run.teacher
        key = os.environ.get(API_KEY_ENV)
        return cls(
            urls=parse_server_urls(teacher.remote_url),
            model=teacher.model_name_or_path,
            request_top_k=run.server_top_k,
            concurrency=teacher.remote_concurrency,
            timeout_s=teacher.timeout_s,
            max_retries=teacher.max_retries,
            extra_headers=(("Authorization", f"Bearer {key}"),) if key else (),
        )

    def pause_before_retry(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): backoff_s doubling, capped."""
        return min(self.backoff_s * 2 ** (retry - 1), self.backoff_cap_s)

    def worst_case_seconds(self) -> float:
        """The longest one request can take before the run stops: every attempt times out."""
        pauses = sum(self.pause_before_retry(r) for r in range(1, self.max_retries + 1))
        return (self.max_retries + 1) * self.timeout_s + pauses

    @property
    def url_text(self) -> str:
        return ",".join(self.urls)
