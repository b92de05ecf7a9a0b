"""Before any rollout: is the server's model the teacher we were told, and does it speak the
student's tokenizer? Every answer is one sentence (ArgumentError), as for a local teacher.

For each server of `--teacher.remote_url`:
1. GET /v1/models serves `--teacher.model_name_or_path` (as its id: the name requests use), with a
   context of at least `--data.max_len` + 1 tokens (a request adds one generated token);
2. the tokenizer is the student's, compared as `tokenizer_compat.check_same_tokenizer` compares two
   local ones, through the server's /detokenize and /tokenize:
   - vocabulary: every id of the student's tokenizer decodes to the same text there (all of them,
     in chunks), and the first id past it decodes to nothing (the server's tokenizer is no larger);
   - merges, pre-tokenization, normalization and special tokens: probe texts (prose, whitespace,
     digits, code, accents, CJK, emoji, the chat template's rendering, every special token) give
     the same ids;
3. one scoring request with `prompt_logprobs` = the number asked per position (`--teacher.remote_top_k`)
   is accepted (the server's --max-logprobs) and answers log-probs in vLLM's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.host.teachers.server.client import (
    ServerAnswerError,
    ServerError,
    ServerPool,
    ServerRefusedError,
    ServerUnavailableError,
    run_concurrently,
)
from tsdkd_plugin.host.teachers.server.settings import ServerTeacherSettings
from tsdkd_plugin.host.teachers.server.signals import ScoringRequest, listed_logprobs

PROBE_TIMEOUT_S = 30.0
VOCAB_CHUNK = 2048
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs and\nnewlines\n\n\nand trailing   ",
    "Q: 12+7=? A: 12+7=19; 19*3=57. #### 57",
    "def square(x):\n    return x ** 2  # comment\n",
    "Größe, naïve café; 東京の天気は晴れ; Привет; 😀👍🏽",
    "1234567890 3.14159 -42 1e-6 0x1F",
)
URL_FLAG, MODEL_FLAG = "--teacher.remote_url", "--teacher.model_name_or_path"


@dataclass(frozen=True)
class ServerFacts:
    """What the check learned: the model id to put in requests and each server's context length."""

    model_id: str
    max_model_len: tuple[int | None, ...]


def _unreachable(url: str, error: ServerError) -> ArgumentError:
    what = error.last_error.what if isinstance(error, ServerUnavailableError) else error.what
    return ArgumentError(
        f"{URL_FLAG} {url}: no vLLM server answered there ({what}); start it as docs/server_teacher.md says "
        f"(vllm serve <teacher> --max-logprobs ... --max-model-len ...) or fix the URL"
    )


def probe_texts(tokenizer) -> list[str]:
    """PROBE_TEXTS, the chat template's rendering of a short exchange, and every special token."""
    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "Q: 12+7=?"}, {"role": "assistant", "content": "12+7=19. #### 19"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    specials = sorted(
        {str(t) for t in tokenizer.all_special_tokens}
        | {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    )
    if specials:
        texts.append("x " + " y ".join(specials) + " z")
    return texts


async def _served_model(pool: ServerPool, url_index: int, settings: ServerTeacherSettings, max_len: int):
    url = settings.urls[url_index]
    try:
        listing = await pool.get("/v1/models", index=url_index, timeout_s=PROBE_TIMEOUT_S, max_retries=1)
    except (ServerUnavailableError, ServerRefusedError, ServerAnswerError) as error:
        raise _unreachable(url, error) from None
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
        raise ArgumentError(
            f"{URL_FLAG} {url}: GET /v1/models did not answer a model list; is it a vLLM "
            f"OpenAI-compatible server (vllm serve)?"
        )
    card = next((c for c in cards if c["id"] == settings.model), None)
    started_from = next((c for c in cards if c.get("root") == settings.model), None)
    if card is None and started_from is not None:
        raise ArgumentError(
            f"{MODEL_FLAG} {settings.model!r}: the server at {url} was started from that model but serves it as "
            f"{started_from['id']!r} (vllm serve --served-model-name); pass {MODEL_FLAG} {started_from['id']}"
        )
    if card is None:
        served = ", ".join(repr(c["id"]) for c in cards) or "nothing"
        raise ArgumentError(
            f"{MODEL_FLAG} {settings.model!r} is not served at {url} (it serves {served}); with {URL_FLAG} the "
            f"teacher is named as the server names it (vllm serve --served-model-name)"
        )
    limit = card.get("max_model_len")
    if isinstance(limit, int) and limit < max_len + 1:
        raise ArgumentError(
            f"the teacher server at {url} accepts {limit} tokens per sequence (its --max-model-len), but a sample "
            f"of --data.max_len {max_len} tokens plus the one token every scoring request generates needs "
            f"{max_len + 1}; restart it with --max-model-len {max_len + 1} or more, or lower --data.max_len"
        )
    return card["id"], limit if isinstance(limit, int) else None


def _tokenizer_mismatch(url: str, model: str, student: str, difference: str) -> ArgumentError:
    return ArgumentError(
        f"the teacher server at {url} ({MODEL_FLAG} {model!r}) does not use the student's tokenizer "
        f"(--actor.model_name_or_path {student!r}): {difference}; token-level distillation compares the two "
        f"models' distributions id by id, so teacher and student must share one tokenizer: serve a teacher from "
        f"the student's model family"
    )


async def _decode(pool: ServerPool, index: int, model_id: str, ids: Sequence[int]) -> str:
    answer = await pool.post(
        "/detokenize", {"model": model_id, "tokens": list(ids)}, index=index, timeout_s=PROBE_TIMEOUT_S, max_retries=1
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("prompt"), str):
        raise ServerAnswerError(pool.settings.urls[index], "/detokenize did not answer {'prompt': text}")
    return answer["prompt"]


async def _first_differing_id(pool, index, model_id, tokenizer, ids: Sequence[int]) -> tuple[int, str, str]:
    """Halve a chunk that decodes differently until one id is left: (id, server text, local text)."""
    while len(ids) > 1:
        half = ids[: len(ids) // 2]
        if await _decode(pool, index, model_id, half) != tokenizer.decode(list(half)):
            ids = half
        else:
            ids = ids[len(ids) // 2 :]
    return ids[0], await _decode(pool, index, model_id, ids), tokenizer.decode(list(ids))


async def _check_tokenizer(pool: ServerPool, index: int, model_id: str, tokenizer, student: str) -> None:
    url = pool.settings.urls[index]
    size = len(tokenizer)
    chunks = [list(range(start, min(start + VOCAB_CHUNK, size))) for start in range(0, size, VOCAB_CHUNK)]
    decoded = await run_concurrently([_decode(pool, index, model_id, chunk) for chunk in chunks])
    for chunk, text in zip(chunks, decoded, strict=True):
        if text != tokenizer.decode(chunk):
            token, there, here = await _first_differing_id(pool, index, model_id, tokenizer, chunk)
            raise _tokenizer_mismatch(
                url, model_id, student, f"token id {token} is {there!r} there and {here!r} in the student's tokenizer"
            )
    beyond = await _decode(pool, index, model_id, [size])
    if beyond:
        raise _tokenizer_mismatch(
            url,
            model_id,
            student,
            f"it has a token at id {size} ({beyond!r}) but the student's tokenizer has {size} tokens",
        )
    for text in probe_texts(tokenizer):
        answer = await pool.post(
            "/tokenize",
            {"model": model_id, "prompt": text, "add_special_tokens": False},
            index=index,
            timeout_s=PROBE_TIMEOUT_S,
            max_retries=1,
        )
        there = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(there, list):
            raise ServerAnswerError(url, "/tokenize did not answer {'tokens': [...]}")
        here = tokenizer(text, add_special_tokens=False)["input_ids"]
        if there != here:
            raise _tokenizer_mismatch(
                url, model_id, student, f"{text[:40]!r} tokenizes to {there[:12]} there and {here[:12]} here"
            )


async def _check_scoring(pool: ServerPool, index: int, model_id: str, tokenizer, request_top_k: int) -> None:
    tokens = tokenizer(PROBE_TEXTS[2], add_special_tokens=False)["input_ids"]
    request = ScoringRequest(tokens, list(range(1, len(tokens))))
    url = pool.settings.urls[index]
    try:
        answer = await pool.post(
            "/v1/completions",
            request.body(model_id, request_top_k),
            index=index,
            timeout_s=max(PROBE_TIMEOUT_S, pool.settings.timeout_s),
            max_retries=1,
        )
    except ServerUnavailableError as error:
        raise ArgumentError(
            f"the teacher server at {url} failed a scoring request with {request_top_k} log-probs per position "
            f"(--teacher.remote_top_k) {error.attempts} times (last: {error.last_error.what}); see its log (more "
            f"log-probs than the model has logit rows fail there)"
        ) from None
    except ServerRefusedError as error:
        if "logprobs" in error.message.lower() and "max allowed" in error.message.lower():
            raise ArgumentError(
                f"the teacher server at {url} returns fewer log-probs per position than the {request_top_k} asked "
                f"(--teacher.remote_top_k, at least --teacher.sparse_top_k): restart it with --max-logprobs "
                f"{request_top_k} or more ({error.message})"
            ) from None
        raise ArgumentError(f"{URL_FLAG} {url}: a scoring request was refused ({error.what})") from None
    try:
        listed_logprobs([answer], [request], request_top_k, url)
    except ServerAnswerError as error:
        raise ArgumentError(
            f"{URL_FLAG} {url}: the answer to a scoring request is not vLLM's prompt log-probs ({error.what})"
        ) from None


def check_server_teacher(
    settings: ServerTeacherSettings, student_tokenizer, *, student: str, max_len: int
) -> ServerFacts:
    """Every check of the module docstring against every server; the facts, or an ArgumentError."""
    from tsdkd_plugin.host.teachers.server.teacher import run_sync

    async def check_all() -> ServerFacts:
        async with ServerPool(settings) as pool:
            served = [await _served_model(pool, i, settings, max_len) for i in range(len(settings.urls))]
            ids = {model_id for model_id, _ in served}
            if len(ids) > 1:
                raise ArgumentError(
                    f"the servers of {URL_FLAG} serve different model names ({', '.join(sorted(ids))}); "
                    f"every server must serve the one teacher"
                )
            model_id = served[0][0]
            for index in range(len(settings.urls)):
                try:
                    await _check_tokenizer(pool, index, model_id, student_tokenizer, student)
                except (ServerUnavailableError, ServerRefusedError, ServerAnswerError) as error:
                    raise ArgumentError(
                        f"{URL_FLAG} {error.url}: the tokenizer check failed ({error}); is it a vLLM OpenAI-compatible "
                        f"server (vllm serve), which has /tokenize and /detokenize?"
                    ) from None
                await _check_scoring(pool, index, model_id, student_tokenizer, settings.request_top_k)
            return ServerFacts(model_id, tuple(limit for _, limit in served))

    return run_sync(check_all())
