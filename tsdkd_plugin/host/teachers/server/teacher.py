"""The teacher behind a vLLM server (`--teacher.remote_url`): scores the student's samples over HTTP
and returns the same sparse signals, in the same wire format, as the Ray teacher group
(`TeacherModelActor.forward`). `ServerDriverTeacher` is its driver-side half (teachers/base.py
`DriverTeacher`); its actor-side half is `ShippedSignals`, as for the Ray group.

One request per sample (its prompt log-probs; `signals.py`), all samples of a step in flight
together up to `--teacher.remote_concurrency`, so the server batches them as it batches any
traffic. A failure that can pass is retried per request (backoff, next server); a request that
still fails, a refusal or a malformed answer stops the run with one sentence
(`ServerTeacherUnavailableError`, `ServerTeacherFailedError`), raised while making experience,
never while saving, so the last checkpoint is intact.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import torch

from tsdkd_plugin.host.faults import TrainingStoppedError
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers.base import (
    STUDENT_CANDIDATES,
    DriverTeacher,
    StepSamples,
    TeacherFailedError,
    TeacherUnavailableError,
    run_on_policy_group,
    timed,
)
from tsdkd_plugin.host.teachers.server.client import (
    ServerAnswerError,
    ServerError,
    ServerPool,
    ServerRefusedError,
    ServerUnavailableError,
    run_concurrently,
)
from tsdkd_plugin.host.teachers.server.settings import API_KEY_ENV, SERVER_TEMPERATURE, ServerTeacherSettings
from tsdkd_plugin.host.teachers.server.signals import (
    ScoringRequest,
    ServerSignalStats,
    answer_listing,
    scoring_requests,
    signals_from_listings,
)
from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig

COMPLETIONS = "/v1/completions"


class ServerTeacherUnavailableError(TeacherUnavailableError):
    """A scoring request failed (connection, timeout, 5xx) on every attempt."""


class ServerTeacherFailedError(TeacherFailedError):
    """The server refused a scoring request (4xx) or answered something that is not prompt log-probs."""


def run_sync(coroutine: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from synchronous code, also where this thread already runs an
    event loop (then in a helper thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target, name="server-teacher-loop")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def refusal_hint(error: ServerRefusedError, settings: ServerTeacherSettings) -> str:
    """What to change for the refusals a misconfigured server gives (vLLM's messages)."""
    message = error.message.lower()
    if "logprobs" in message and "max allowed" in message:
        return f" (restart the server with --max-logprobs {settings.request_top_k} or more)"
    if "maximum context length" in message:
        return " (restart the server with a larger --max-model-len: --data.max_len + 1 or more)"
    if error.status == 404:
        return f" (--teacher.model_name_or_path {settings.model!r} must be a model the server serves: GET /v1/models)"
    if error.status in (401, 403):
        return f" (the server wants an API key, vllm serve --api-key: export {API_KEY_ENV}=<key> before launching)"
    return ""


def stop_error(error: ServerError, settings: ServerTeacherSettings, resume: str) -> TrainingStoppedError:
    """The one-sentence stop for a failed scoring request."""
    if isinstance(error, ServerUnavailableError):
        return ServerTeacherUnavailableError(
            f"TSD-KD stopped: the teacher server (--teacher.remote_url {settings.url_text}) failed to answer a scoring "
            f"request {error.attempts} times (--teacher.max_retries {settings.max_retries}, --teacher.timeout_s "
            f"{settings.timeout_s:g} each); last error from {error.last_error.url}: {error.last_error.what}; {resume}"
        )
    if isinstance(error, ServerRefusedError):
        return ServerTeacherFailedError(
            f"TSD-KD stopped: the teacher server at {error.url} (--teacher.remote_url) refused a scoring request with "
            f"{error.what}{refusal_hint(error, settings)}; the same request would be refused again, so it was not "
            f"retried; fix the cause, then {resume}"
        )
    return ServerTeacherFailedError(
        f"TSD-KD stopped: the teacher server at {error.url} (--teacher.remote_url) answered a scoring request with "
        f"something other than vLLM's prompt log-probs ({error.what}); it was not retried; check that the URL is a "
        f"vLLM OpenAI-compatible server (vllm serve) started as docs/server_teacher.md says, then {resume}"
    )


class ServerTeacher:
    """Teacher signals from a vLLM OpenAI-compatible server (see module docstring).

    `score(batches)` takes the micro-batches `TeacherModelActor.forward` takes (sequences,
    action_mask, attention_mask and, with the token-level ranking, candidate_ids) and returns
    their wire dicts (`TeacherSignals.to_wire()`), in order.
    """

    def __init__(
        self,
        settings: ServerTeacherSettings,
        config: TSDKDConfig,
        shared_vocab_size: int,
        *,
        ckpt_path: str | None = None,
    ):
        if config.temperature != SERVER_TEMPERATURE:
            raise ValueError(
                f"the server teacher gives log-probs at temperature {SERVER_TEMPERATURE:g} only (vLLM applies no "
                f"temperature to prompt log-probs), but --tsdkd.temperature is {config.temperature:g}"
            )
        if settings.request_top_k < config.sparse_top_k:
            raise ValueError(
                f"the server is asked for {settings.request_top_k} log-probs per position, fewer than the "
                f"--teacher.sparse_top_k {config.sparse_top_k} shipped to the actors"
            )
        self.settings = settings
        self.config = config
        self.shared_vocab_size = shared_vocab_size
        self.ckpt_path = ckpt_path
        self.model = settings.model  # a /v1/models id (the preflight checked it)
        self.last_stats = ServerSignalStats()
        self.last_timing: dict[str, float] = {}
        self._requests_made = 0  # round-robin position over the servers

    def _resume(self) -> str:
        if self.ckpt_path is None:
            return "rerun the same command"
        from tsdkd_plugin.host.checkpoint import resume_hint

        return resume_hint(self.ckpt_path)

    def score(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches' signals as the Ray teacher ships them (wire dicts of CPU tensors)."""
        return [{name: tensor.cpu() for name, tensor in signals.to_wire().items()} for signals in self.signals(batches)]

    def signals(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[TeacherSignals]:
        """The micro-batches' TeacherSignals (float32, before the wire's float16)."""
        started = time.time()
        try:
            results = run_sync(self._score(batches))
        except (ServerUnavailableError, ServerRefusedError, ServerAnswerError) as error:
            raise stop_error(error, self.settings, self._resume()) from None
        self.last_stats = _merge_stats([stats for _, stats in results])
        self.last_timing["seconds"] = time.time() - started
        return [signals for signals, _ in results]

    async def _score(self, batches: Sequence[Mapping[str, torch.Tensor]]):
        prepared = []
        for batch in batches:
            requests, mask = scoring_requests(
                batch["sequences"], batch["action_mask"], batch["attention_mask"], self.shared_vocab_size
            )
            prepared.append((requests, mask, batch.get("candidate_ids")))
        first = self._requests_made
        every_request = [request for requests, _, _ in prepared for request in requests]
        self._requests_made += len(every_request)
        request_top_k = self.settings.request_top_k

        async def scored(number: int, request: ScoringRequest):
            answer = await pool.post(COMPLETIONS, request.body(self.model, request_top_k), index=first + number)
            return answer_listing(answer, request, request_top_k, self.settings.url_text, number)

        async with ServerPool(self.settings) as pool:
            listings = await run_concurrently([scored(i, request) for i, request in enumerate(every_request)])
        self.last_timing = {
            "requests": len(every_request),
            "retries": pool.retries,
            "answer_bytes": pool.bytes_received,
        }
        results, start = [], 0
        for requests, mask, candidates in prepared:
            batch_listings = listings[start : start + len(requests)]
            start += len(requests)
            results.append(signals_from_listings(
                batch_listings, mask, candidates, top_k=self.config.sparse_top_k,
                shared_vocab_size=self.shared_vocab_size, url=self.settings.url_text,
            ))  # fmt: skip
        return results


def _merge_stats(parts: Sequence[ServerSignalStats]) -> ServerSignalStats:
    """Position-weighted means over micro-batches."""
    total = sum(p.positions for p in parts)
    merged = ServerSignalStats(positions=total)
    if not total:
        return merged
    for name in (
        "unlisted_shared_mass",
        "entropy_bound",
        "listed_padding_mass",
        "filled_top_places",
        "unlisted_candidates",
    ):
        setattr(merged, name, sum(getattr(p, name) * p.positions for p in parts) / total)
    return merged


class ServerDriverTeacher(DriverTeacher):
    """Student candidates from the policy group, then the server's sparse signals (`ServerTeacher`).
    A stop after the retry budget is a `TeacherUnavailableError` (a refusal or garbage:
    `TeacherFailedError`), raised while making experience, so the latest checkpoint is intact."""

    def __init__(self, policy_group, run: RunConfig, *, shared_vocab_size: int, duplicate_factor: int, ckpt_path: str):
        self.policy_group = policy_group
        self.duplicate_factor = duplicate_factor  # policy actors per ring-attention / tensor-parallel group
        self.server = ServerTeacher(
            ServerTeacherSettings.of_run(run), run.objective, shared_vocab_size, ckpt_path=ckpt_path
        )

    def signals(self, samples: StepSamples, times: dict[str, float]) -> list[dict[str, torch.Tensor]]:
        with timed(times, "student_candidates"):
            candidates = run_on_policy_group(self.policy_group, STUDENT_CANDIDATES, samples, self.duplicate_factor)
        with timed(times, "teacher_scoring"):  # HTTP requests + sparse signals
            batches = [
                dict(sequences=s, action_mask=a, attention_mask=m, candidate_ids=c)
                for s, a, m, c in zip(
                    samples.sequences, samples.action_mask, samples.attention_mask, candidates, strict=True
                )
            ]
            signals = self.server.score(batches)
        stats, timing = self.server.last_stats, self.server.last_timing
        # What the approximation left out (docs/server_teacher.md) and what the server cost, per step.
        times["tsdkd/teacher_server_retries"] = float(timing.get("retries", 0))
        times["tsdkd/teacher_unlisted_mass"] = stats.unlisted_shared_mass
        times["tsdkd/teacher_unlisted_candidates"] = stats.unlisted_candidates
        return signals
