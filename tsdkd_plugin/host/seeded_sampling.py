"""Rollouts that a resumed run repeats exactly, with sampling on.

Two things make upstream's rollouts differ between an uninterrupted run and a resumed one:
- vLLM samples from each engine's own random stream, whose state depends on everything the
  engine generated before (and on how requests were batched), and a resumed run has a fresh
  engine. Here every sample gets its own seed, derived from --train.seed, the prompt's position
  in the run's prompt stream (upstream's `total_consumed_prompts`, which a checkpoint restores)
  and the sample's index, so sample j of prompt i is the same draw whenever it is made.
- upstream collects a rollout in vLLM's completion order, which varies from run to run; the
  step's samples are put in an order fixed by their content (prompt by prompt, a prompt's n
  samples kept together), so micro-batches, and losses taken per micro-batch, are the same.

Upstream's `SamplesGenerator._dispatch_prompts_to_vllm` builds one `SamplingParams` for all
prompts and asks each engine for a prompt's n samples in one call (`generate_responses(...,
num_samples=n)`), which runs n generations with that one SamplingParams: there is no place for
a seed per sample. `SeededDispatch` keeps upstream's dispatch (its SamplingParams, its engine
balancing) and only stands in for the engines while it runs: each `generate_responses` call
becomes n one-sample calls, each with a copy of the SamplingParams carrying its own seed,
joined back into one result by one long-lived Ray actor (`ResponseJoiner`), so upstream sees one
reference per prompt as before (its per-prompt dynamic filtering keeps working). The tokenizer
those calls carry is sent by name (`EngineTokenizer`), not pickled n times per prompt. Evaluation
rollouts are left as upstream makes them. This module imports no OpenRLHF or vLLM code: the joiner
runs in a plain Ray worker.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import ray

SEED_BITS = 63


def sample_seed(base_seed: int, prompt_position: int, sample_index: int) -> int:
    """A 63-bit seed for sample `sample_index` of the prompt at `prompt_position` of the run's prompt
    stream: independent draws for every (prompt, sample), the same draw in a resumed run."""
    digest = hashlib.blake2b(f"{base_seed}:{prompt_position}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)


def with_seed(sampling_params, seed: int):
    """A copy of vLLM's SamplingParams with a per-request seed."""
    seeded = copy.deepcopy(sampling_params)
    seeded.seed = seed
    return seeded


@ray.remote(num_cpus=0)
class ResponseJoiner:
    """Joins each prompt's n one-sample responses, in one worker process for the whole run.

    It was a Ray task per prompt. A zero-CPU task has no concurrency limit, so the first rollout made
    Ray start a worker process for nearly every prompt (dozens), each importing torch to unpickle the
    responses: about two minutes of a run's first rollout on a 2-core machine (later rollouts reused
    the workers). Async, so a prompt whose samples are done is joined without waiting for earlier
    prompts."""

    async def join(self, *responses_per_sample: list[Any]) -> list[Any]:
        """One prompt's n one-sample responses as the list `generate_responses(num_samples=n)` returns."""
        return [response for responses in responses_per_sample for response in responses]


class EngineTokenizer:
    """The student's tokenizer as the vLLM engines use it (to tokenize a prompt, to decode a sample
    for a reward function), sent as its name and loaded once per engine process.

    Upstream sends the whole tokenizer with every request (a Qwen tokenizer pickles to ~15 MB);
    n one-sample requests per prompt would multiply that by n. Loaded as OpenRLHF's get_tokenizer
    loads it; its ids and decoding are the trainer's tokenizer's."""

    _loaded: dict[tuple[str, bool], Any] = {}  # per process

    def __init__(self, name_or_path: str, use_fast: bool = True):
        self.name_or_path, self.use_fast = name_or_path, use_fast

    def __reduce__(self):
        return EngineTokenizer, (self.name_or_path, self.use_fast)

    def tokenizer(self):
        key = (self.name_or_path, self.use_fast)
        if key not in EngineTokenizer._loaded:
            from transformers import AutoTokenizer

            EngineTokenizer._loaded[key] = AutoTokenizer.from_pretrained(
                self.name_or_path, trust_remote_code=True, use_fast=self.use_fast
            )
        return EngineTokenizer._loaded[key]

    def __call__(self, *args, **kwargs):
        return self.tokenizer()(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("name_or_path", "use_fast") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tokenizer(), name)


class _SeededGenerateResponses:
    """`engine.generate_responses` while a dispatch runs: `.remote(**kwargs)` as upstream calls it."""

    def __init__(self, engine, dispatch: SeededDispatch):
        self._engine, self._dispatch = engine, dispatch

    def remote(self, *, sampling_params, num_samples: int = 1, **kwargs):
        position = self._dispatch.next_prompt_position()
        seed = self._dispatch.sampling_seed
        kwargs["hf_tokenizer"] = self._dispatch.engine_tokenizer()
        refs = [
            self._engine.generate_responses.remote(
                sampling_params=with_seed(sampling_params, sample_seed(seed, position, index)), num_samples=1, **kwargs
            )
            for index in range(num_samples)
        ]
        return self._dispatch.response_joiner().join.remote(*refs)


class SeededEngine:
    """Stands in for a vLLM engine actor while upstream's `_dispatch_prompts_to_vllm` runs; every
    other method (e.g. `get_num_unfinished_requests`) is the engine's own."""

    def __init__(self, engine, dispatch: SeededDispatch):
        self._engine = engine
        self.generate_responses = _SeededGenerateResponses(engine, dispatch)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def ordered_by_content(samples: Sequence, n_samples_per_prompt: int) -> list:
    """The rollout's samples in an order fixed by their content: groups of a prompt's n samples
    (upstream keeps them consecutive) sorted by prompt text, then by their token ids."""
    n = n_samples_per_prompt
    if n < 1 or len(samples) % n:
        return list(samples)
    groups = [list(samples[start : start + n]) for start in range(0, len(samples), n)]

    def key(group):
        return (str(group[0].prompts[0]), [sample.sequences.reshape(-1).tolist() for sample in group])

    return [sample for group in sorted(groups, key=key) for sample in group]


class SeededDispatch:
    """Mixin for upstream's SamplesGenerator (put it first in the bases): seeded training rollouts
    in a content-fixed order. `prompts_dispatched` must equal upstream's `total_consumed_prompts`;
    the trainer sets it when it resumes."""

    sampling_seed: int = 0
    prompts_dispatched: int = 0
    _seeding: bool = False

    _joiner = None

    def response_joiner(self):
        """The run's ResponseJoiner actor, started at the first seeded dispatch."""
        if self._joiner is None:
            self._joiner = ResponseJoiner.remote()
        return self._joiner

    def engine_tokenizer(self) -> EngineTokenizer:
        return EngineTokenizer(self.args.actor.model_name_or_path, not self.args.data.disable_fast_tokenizer)

    def next_prompt_position(self) -> int:
        position = self.prompts_dispatched
        self.prompts_dispatched += 1
        return position

    def generate_samples(self, **generate_kwargs):
        self._seeding = True
        try:
            samples, pass_rate, consumed, exhausted = super().generate_samples(**generate_kwargs)
        finally:
            self._seeding = False
        n = generate_kwargs.get("n_samples_per_prompt", self.args.rollout.n_samples_per_prompt)
        return ordered_by_content(samples, n), pass_rate, consumed, exhausted

    def _dispatch_prompts_to_vllm(self, prompts, labels, *, images=None, **generate_kwargs):
        if not self._seeding:  # evaluation: upstream's sampling
            return super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        engines = self.vllm_engines
        self.vllm_engines = [SeededEngine(engine, self) for engine in engines]
        try:
            return super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        finally:
            self.vllm_engines = engines
