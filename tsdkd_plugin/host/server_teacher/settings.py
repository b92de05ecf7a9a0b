"""What the server teacher needs to know about its server(s): one frozen, validated object.

The launch flags (`--teacher.remote_url`, ...) are turned into `ServerTeacherSettings` once, before
any Ray worker starts; every later part (the preflight check, the HTTP client, the experience
maker's teacher) reads this object, never the raw arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple
from urllib.parse import urlsplit

DEFAULT_CONCURRENCY = 16
DEFAULT_BACKOFF_S = 1.0
DEFAULT_BACKOFF_CAP_S = 30.0
# vLLM's prompt log-probs are the model's raw distribution: no temperature is applied to prompt
# tokens (vllm/config/model.py, `logprobs_mode`), so the server teacher serves tau = 1 only.
SERVER_TEMPERATURE = 1.0
# A server started with `vllm serve --api-key KEY` wants "Authorization: Bearer KEY"; the key is read
# from this environment variable at launch (never a flag: command lines end up in logs).
API_KEY_ENV = "TSDKD_TEACHER_API_KEY"


def parse_server_urls(text: str) -> Tuple[str, ...]:
    """'http://a:8000,http://b:8000' -> ('http://a:8000', 'http://b:8000'): base URLs of vLLM
    OpenAI-compatible servers (a trailing '/' or '/v1' is dropped: the client adds the paths).
    Raises ValueError naming the bad entry."""
    urls = []
    for part in (text or "").split(","):
        url = part.strip().rstrip("/")
        if not url:
            continue
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{part.strip()!r} is not an http(s) URL with a host, e.g. http://10.0.0.5:8000")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise ValueError(f"{part.strip()!r} has an invalid port") from None
        urls.append(url)
    if not urls:
        raise ValueError("no URL given; e.g. http://10.0.0.5:8000 (several: comma-separated)")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{text!r} names the same server twice")
    return tuple(urls)


@dataclass(frozen=True)
class ServerTeacherSettings:
    """A teacher served by vLLM's OpenAI-compatible server(s), as the launch flags set it."""

    urls: Tuple[str, ...]
    """Base URLs of the servers (`--teacher.remote_url`, comma-separated); requests go round-robin
    and a retried request moves on to the next server."""
    model: str
    """The served model name (`--teacher.model_name_or_path`): the `model` of every request, one of
    the server's /v1/models ids (or the path it was started from)."""
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
    extra_headers: Tuple[Tuple[str, str], ...] = field(default=())
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
