"""A stand-in for a vLLM server, for tests and benchmarks of the server teacher without one.

`prompt_logprobs_answer` computes, from a model's logits, the /v1/completions answer vLLM 0.29
gives (vllm/v1/worker/gpu_model_runner.py `_get_prompt_logprobs_dict`, serving's JSON): per
position the top-R log-probs over all logit rows in float32, plus the prompt's own token, keyed by
the token id as a string. `FakeVLLMServer` serves such answers (and /v1/models, /tokenize,
/detokenize) over HTTP on the loopback address from a thread, and can be told to misbehave: die,
answer garbage, answer slowly, or refuse. The real server is exercised by
tests/host/test_server_teacher_vllm.py; this is what the failure tests and fast tests use.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def prompt_logprobs_answer(
    logits: torch.Tensor, tokens: Sequence[int], request_top_k: int, model: str = "teacher", as_logits: bool = False
) -> dict:
    """vLLM's answer for prompt `tokens` whose next-token logits are `logits` [L, rows] (row i
    predicts tokens[i + 1]). as_logits: answer raw logits, as a server with --logprobs-mode raw_logits does."""
    scores = logits.float() if as_logits else torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(scores, request_top_k, dim=-1)
    per_position: list[dict | None] = [None]
    for i in range(1, len(tokens)):
        target = int(tokens[i])
        entry = {str(target): {"logprob": float(scores[i - 1, target]), "rank": 0, "decoded_token": ""}}
        for rank, (token, value) in enumerate(
            zip(top.indices[i - 1].tolist(), top.values[i - 1].tolist(), strict=True), 1
        ):
            entry[str(token)] = {"logprob": float(value), "rank": rank, "decoded_token": ""}
        per_position.append(entry)
    return {
        "id": "cmpl-emulated",
        "object": "text_completion",
        "model": model,
        "choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": per_position}],
    }


@dataclass
class Misbehaviour:
    """What the fake server does to /v1/completions requests (changeable while it runs)."""

    die_after: int | None = None  # close the listening socket after this many answered requests
    delay_s: float = 0.0  # wait before answering
    slow_attempts: int = 0  # only the first N requests are delayed
    garbage: str | None = None  # answer this body (HTTP 200) instead
    status: int | None = None  # answer this HTTP status with an error body instead
    status_attempts: int | None = None  # only the first N requests get `status` (None: all)
    as_logits: bool = False  # answer raw logits (a server with --logprobs-mode raw_logits)


@dataclass
class FakeVLLMServer:
    """An HTTP server on 127.0.0.1 answering like vLLM from `logits_of(tokens) -> [L, rows]`.

    tokenizer: the HF tokenizer behind /tokenize and /detokenize (None: those routes answer 404).
    decode_override: {token id: text} /detokenize answers differently (another vocabulary)."""

    logits_of: Callable[[list[int]], torch.Tensor]
    served_model_name: str = "teacher"
    max_model_len: int = 4096
    max_logprobs: int = 20
    tokenizer: object = None
    decode_override: dict[int, str] = field(default_factory=dict)
    misbehaviour: Misbehaviour = field(default_factory=Misbehaviour)
    completions: int = 0  # /v1/completions requests received
    answered: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self):
        from tsdkd_plugin.host.device import free_ports

        self.port = free_ports(1)[0]
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- routes ------------------------------------------------------------------------------------
    def _error(self, status: int, message: str):
        from aiohttp import web

        return web.json_response(
            {"error": {"message": message, "type": "BadRequestError", "code": status}}, status=status
        )

    async def _models(self, request):
        from aiohttp import web

        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.served_model_name,
                        "object": "model",
                        "root": "/models/" + self.served_model_name,
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    async def _tokenize(self, request):
        from aiohttp import web

        if self.tokenizer is None:
            return self._error(404, "Not Found")
        body = await request.json()
        ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def _detokenize(self, request):
        from aiohttp import web

        if self.tokenizer is None:
            return self._error(404, "Not Found")
        ids = (await request.json())["tokens"]
        size = len(self.tokenizer)
        pieces, run = [], []
        for token in ids:  # decode runs of unchanged ids together, as the real tokenizer would
            if token in self.decode_override:
                pieces.append(self.tokenizer.decode(run))
                run = []
                pieces.append(self.decode_override[token])
            elif token < size:
                run.append(token)
        pieces.append(self.tokenizer.decode(run))
        return web.json_response({"prompt": "".join(pieces)})

    async def _completions(self, request):
        from aiohttp import web

        bad = self.misbehaviour
        if bad.die_after is not None and self.answered >= bad.die_after:  # dead, the listener not yet closed
            request.transport.close()
            return web.Response()
        self.completions += 1
        number = self.completions
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if bad.delay_s and number <= (bad.slow_attempts or number):
                await asyncio.sleep(bad.delay_s)
            if bad.status is not None and (bad.status_attempts is None or number <= bad.status_attempts):
                return self._error(bad.status, f"emulated HTTP {bad.status}")
            if bad.garbage is not None:
                return web.Response(text=bad.garbage, content_type="text/html")
            body = await request.json()
            if body.get("model") != self.served_model_name:
                return self._error(404, f"The model `{body.get('model')}` does not exist.")
            top_k = body.get("prompt_logprobs")
            if top_k > self.max_logprobs:
                return self._error(
                    400, f"Requested prompt logprobs of {top_k}, which is greater than max allowed: {self.max_logprobs}"
                )
            tokens = body["prompt"]
            if len(tokens) + body.get("max_tokens", 16) > self.max_model_len:
                return self._error(400, f"This model's maximum context length is {self.max_model_len} tokens.")
            answer = prompt_logprobs_answer(
                self.logits_of(tokens), tokens, top_k, self.served_model_name, as_logits=bad.as_logits
            )
            self.answered += 1
            if bad.die_after is not None and self.answered >= bad.die_after:
                asyncio.get_running_loop().create_task(self._close_listener())
            return web.json_response(answer)
        finally:
            self.in_flight -= 1

    async def _close_listener(self):
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()  # the port refuses connections, open keep-alive connections are closed

    # -- lifecycle ---------------------------------------------------------------------------------
    async def _start(self):
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> FakeVLLMServer:
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-vllm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def die(self) -> None:
        """Stop listening now (connections are refused from then on)."""
        asyncio.run_coroutine_threadsafe(self._close_listener(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close_listener(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> FakeVLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def openrlhf_micro_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int):
    """(sequences, attention_mask, action_mask) of a micro-batch as OpenRLHF 0.11.2 hands it to the
    teacher: one Experience per sample as its sample generator builds them (prompt + response
    tokens, action_mask[t] = 1 where token t + 1 is a response token), joined by upstream's own
    `Experience.concat_experiences` (right padding)."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    samples = []
    for prompt, response in zip(prompts, responses, strict=True):
        tokens = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        action = torch.zeros(len(tokens), dtype=torch.long)
        action[len(prompt) :] = 1
        samples.append(
            Experience(
                sequences=tokens.unsqueeze(0),
                attention_mask=torch.ones_like(tokens).unsqueeze(0),
                action_mask=action[1:].unsqueeze(0),
            )
        )
    batch = Experience.concat_experiences(samples, pad_token_id)
    return batch.sequences, batch.attention_mask, batch.action_mask.bool()
