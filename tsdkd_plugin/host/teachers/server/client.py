"""HTTP to the teacher's server(s): bounded concurrency, a timeout per request, retries with
backoff for failures that can pass, and errors that say which kind of failure it was.

Built on aiohttp (what OpenRLHF's own remote reward client uses). Every public call is a
coroutine; `run_concurrently` runs a batch of them and cancels the rest at the first failure.

Failure kinds (each an exception class below):
- `TransientServerError`: can pass on a retry: connection refused or reset, a server that closed
  the connection or cut its answer short, no answer within the timeout, HTTP 5xx, 408 or 429.
- `ServerRefusedError`: the server answered 4xx (other than 408/429): the same request would be
  refused again (e.g. prompt_logprobs above the server's --max-logprobs, an unknown model name, a
  sequence longer than its --max-model-len).
- `ServerAnswerError`: an answer that is not what a vLLM server sends (not JSON, fields missing,
  values that are not log-probs); raised by whoever reads the answer.
- `ServerUnavailableError`: a request failed with transient errors on every attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tsdkd_plugin.host.teachers.server.settings import ServerTeacherSettings

logger = logging.getLogger(__name__)

# Statuses that say "try again": the server is overloaded, restarting or timed out itself.
TRANSIENT_STATUSES = (408, 429)
ANSWER_EXCERPT_CHARS = 200


class ServerError(Exception):
    """A failed exchange with one server. str() is one line naming the server and what happened."""

    def __init__(self, url: str, what: str):
        super().__init__(url, what)
        self.url, self.what = url, what

    def __str__(self) -> str:
        return f"{self.url}: {self.what}"


class TransientServerError(ServerError):
    """A failure that can pass: the request is retried."""


class ServerRefusedError(ServerError):
    """HTTP 4xx: the server refuses this request and would refuse it again."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(url, f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ServerAnswerError(ServerError):
    """The answer is not what a vLLM OpenAI-compatible server sends."""


class ServerUnavailableError(ServerError):
    """Every attempt of one request failed with a transient error."""

    def __init__(self, attempts: int, last_error: TransientServerError):
        super().__init__(last_error.url, f"{attempts} attempts failed; last: {last_error.what}")
        self.attempts, self.last_error = attempts, last_error


def _one_line(text: str, limit: int = ANSWER_EXCERPT_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_message(text: str) -> str:
    """The message of an error answer: vLLM's {"error": {"message": ...}} (or FastAPI's {"detail": ...})."""
    try:
        data = json.loads(text)
    except ValueError:
        return _one_line(text) or "(empty answer)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _one_line(error["message"], 400)
        for key in ("message", "detail"):
            if data.get(key):
                return _one_line(str(data[key]), 400)
    return _one_line(text)


def _connection_failure(error: BaseException) -> str:
    """'connection refused', 'server disconnected', ... from aiohttp's exception."""
    import aiohttp

    if isinstance(error, aiohttp.ClientConnectorError):
        reason = getattr(error, "os_error", None) or error
        return f"cannot connect ({_one_line(getattr(reason, 'strerror', None) or reason)})"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(error, aiohttp.ClientPayloadError):
        return f"the answer was cut short ({_one_line(error)})"
    return f"{type(error).__name__}: {_one_line(error) or 'connection failed'}"


class ServerPool:
    """Requests to the teacher's server(s) with the settings' bounds. Use inside one event loop:

    async with ServerPool(settings) as pool:
        answer = await pool.post("/v1/completions", body, index=i)
    """

    def __init__(self, settings: ServerTeacherSettings, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.settings = settings
        self._sleep = sleep
        self._session = None
        self._slots: asyncio.Semaphore | None = None
        self.attempts = 0  # every HTTP attempt, for the run's statistics
        self.retries = 0
        self.bytes_received = 0

    async def __aenter__(self) -> ServerPool:
        import aiohttp

        limit = self.settings.concurrency
        # One connection per request in flight; the client itself adds no retries or timeouts of its own.
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        self._session = aiohttp.ClientSession(connector=connector, headers=dict(self.settings.extra_headers))
        self._slots = asyncio.Semaphore(limit)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._session.close()

    async def _attempt(self, method: str, url: str, path: str, body: dict | None, timeout_s: float) -> Any:
        """One HTTP exchange; the parsed JSON answer or one of the ServerError kinds."""
        import aiohttp

        try:
            async with self._slots:
                self.attempts += 1
                async with self._session.request(
                    method, url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
                ) as response:
                    status = response.status
                    text = await response.text()
                    self.bytes_received += len(text)
        except TimeoutError:  # asyncio's and aiohttp's timeouts are both TimeoutError on Python >= 3.11
            raise TransientServerError(url, f"no answer within {timeout_s:g} s") from None
        except asyncio.TimeoutError:  # Python 3.10: a different class
            raise TransientServerError(url, f"no answer within {timeout_s:g} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise TransientServerError(url, _connection_failure(error)) from None
        except aiohttp.ClientError as error:  # an invalid URL, too many redirects: trying again changes nothing
            raise ServerRefusedError(url, 0, f"{type(error).__name__}: {_one_line(error)}") from None
        if status >= 500 or status in TRANSIENT_STATUSES:
            raise TransientServerError(url, f"HTTP {status}: {_error_message(text)}")
        if status >= 400:
            raise ServerRefusedError(url, status, _error_message(text))
        try:
            return json.loads(text)
        except ValueError:
            raise ServerAnswerError(url, f"HTTP {status} answer is not JSON: {_one_line(text) or '(empty)'}") from None

    async def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        index: int = 0,
        timeout_s: float | None = None,
        max_retries: int | None = None,
    ) -> Any:
        """`method path` on server `index % len(urls)`, retried (on the next server) after a transient
        failure up to max_retries times with the settings' backoff; then ServerUnavailableError.
        A refusal or an unparsable answer is raised at once."""
        settings = self.settings
        timeout_s = settings.timeout_s if timeout_s is None else timeout_s
        max_retries = settings.max_retries if max_retries is None else max_retries
        urls = settings.urls
        last_error = None
        for attempt in range(1, max_retries + 2):
            url = urls[(index + attempt - 1) % len(urls)]
            try:
                return await self._attempt(method, url, path, body, timeout_s)
            except TransientServerError as error:
                last_error = error
                logger.warning(f"teacher server request {path}: attempt {attempt}/{max_retries + 1} failed ({error})")
            if attempt <= max_retries:
                self.retries += 1
                await self._sleep(settings.pause_before_retry(attempt))
        raise ServerUnavailableError(max_retries + 1, last_error)

    async def post(self, path: str, body: dict, **kwargs) -> Any:
        return await self.request("POST", path, body, **kwargs)

    async def get(self, path: str, **kwargs) -> Any:
        return await self.request("GET", path, None, **kwargs)


async def run_concurrently(coroutines: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await all, results in order. At the first exception the others are cancelled (their
    requests dropped) and that exception is raised: a stopping run does not wait for the rest.
    (asyncio.TaskGroup does this from Python 3.11; OpenRLHF supports 3.10.)"""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t in done and not t.cancelled() and t.exception() is not None), None)
        if failed is not None:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failed.exception()
        return [task.result() for task in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
