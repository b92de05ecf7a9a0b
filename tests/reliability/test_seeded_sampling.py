"""Exact resume with sampling, the parts that need no cluster (issue: reliability, exact resume):
a seed per sample through upstream's own dispatch, a rollout order fixed by content, the engines'
tokenizer sent by name, RNG states saved and restored. End to end: test_resume_e2e.py (runs A, B, B')."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import numpy
import pytest
import torch

from tsdkd_plugin.host import seeded_sampling
from tsdkd_plugin.host.seeded_sampling import EngineTokenizer, ordered_by_content, sample_seed, with_seed


def test_sample_seeds_are_fixed_by_prompt_position_and_sample():
    seeds = {(p, j): sample_seed(42, p, j) for p in range(50) for j in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # independent draws for every (prompt, sample)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert sample_seed(42, 7, 3) == seeds[(7, 3)] and sample_seed(43, 7, 3) != seeds[(7, 3)]


def test_with_seed_copies_vllm_sampling_params():
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16)
    seeded = with_seed(params, 1234)
    assert seeded.seed == 1234 and params.seed is None
    assert (seeded.temperature, seeded.top_p, seeded.max_tokens) == (1.0, 0.9, 16)


class FakeEngine:
    """A vLLM engine actor handle as upstream's dispatch uses it (`.method.remote(...)`)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls
        self.generate_responses = SimpleNamespace(remote=self._generate)
        self.get_num_unfinished_requests = SimpleNamespace(remote=lambda: 0)

    def _generate(self, **kwargs):
        self.calls.append((self.name, kwargs))
        return f"ref-{len(self.calls)}"


@pytest.fixture
def generator(monkeypatch, toy_student_dir):
    """SeededDispatch over upstream's real SamplesGenerator._dispatch_prompts_to_vllm, with fake engines
    and Ray's get/join replaced (the shape of upstream's engine calls is what is under test)."""
    import openrlhf.trainer.ppo_utils.samples_generator as upstream

    monkeypatch.setattr(upstream.ray, "get", lambda refs: list(refs))

    class Generator(seeded_sampling.SeededDispatch, upstream.SamplesGenerator):
        pass

    calls = []
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=3),
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off")),
        actor=SimpleNamespace(model_name_or_path=str(toy_student_dir)),
        data=SimpleNamespace(disable_fast_tokenizer=False),
    )
    strategy = SimpleNamespace(args=args)
    made = Generator(
        strategy,
        None,
        None,
        tokenizer="the-trainer's-tokenizer",
        vllm_engines=[FakeEngine("e0", calls), FakeEngine("e1", calls)],
    )
    made.sampling_seed = 42
    made._joiner = SimpleNamespace(join=SimpleNamespace(remote=lambda *refs: ("joined", refs)))
    return made, calls


def test_each_sample_gets_its_own_seed_through_upstreams_dispatch(generator):
    made, calls = generator
    made._seeding = True
    refs = made._dispatch_prompts_to_vllm(["p0", "p1"], ["l0", "l1"], temperature=1.0, max_new_tokens=8, max_len=64)
    refs += made._dispatch_prompts_to_vllm(["p2"], ["l2"], temperature=1.0, max_new_tokens=8, max_len=64)
    assert len(refs) == 3 and all(ref[0] == "joined" and len(ref[1]) == 3 for ref in refs)  # one ref per prompt
    assert [kwargs["prompt"] for _, kwargs in calls] == ["p0"] * 3 + ["p1"] * 3 + ["p2"] * 3
    assert all(kwargs["num_samples"] == 1 for _, kwargs in calls)
    seeds = [kwargs["sampling_params"].seed for _, kwargs in calls]
    assert seeds == [sample_seed(42, position, j) for position in range(3) for j in range(3)]
    first = calls[0][1]["sampling_params"]
    assert (first.temperature, first.max_tokens) == (1.0, 8)  # upstream's SamplingParams, seeded copies
    assert all(isinstance(kwargs["hf_tokenizer"], EngineTokenizer) for _, kwargs in calls)
    assert {engine for engine, _ in calls} == {"e0", "e1"}  # upstream's load balancing still spreads prompts
    assert made.prompts_dispatched == 3 and isinstance(made.vllm_engines[0], FakeEngine)


def test_evaluation_rollouts_are_left_to_upstream(generator):
    made, calls = generator
    refs = made._dispatch_prompts_to_vllm(["p0"], ["l0"], temperature=0.6, n_samples_per_prompt=4)
    assert refs == ["ref-1"] and calls[0][1]["num_samples"] == 4 and calls[0][1]["sampling_params"].seed is None
    assert calls[0][1]["hf_tokenizer"] == "the-trainer's-tokenizer" and made.prompts_dispatched == 0


def sample(prompt, tokens):
    return SimpleNamespace(prompts=[prompt], sequences=torch.tensor([tokens]))


def test_rollout_order_is_fixed_by_content_and_keeps_prompt_groups():
    groups = [
        [sample("b", [1, 2]), sample("b", [1, 3])],
        [sample("a", [5]), sample("a", [4])],
        [sample("c", [0]), sample("c", [9])],
    ]
    expected = ordered_by_content([s for g in groups for s in g], 2)
    for order in ([2, 0, 1], [1, 2, 0], [0, 1, 2]):  # vLLM's completion order varies; the result does not
        arrived = [s for i in order for s in groups[i]]
        assert ordered_by_content(arrived, 2) == expected
    assert [s.prompts[0] for s in expected] == ["a", "a", "b", "b", "c", "c"]
    assert [s.sequences.tolist() for s in expected[:2]] == [[[5]], [[4]]]  # within a group, the dispatch order


def test_engines_receive_the_tokenizer_by_name(toy_student_dir, toy_tokenizer):
    shipped = EngineTokenizer(str(toy_student_dir))
    blob = pickle.dumps(shipped)
    assert len(blob) < 1000 < len(pickle.dumps(toy_tokenizer))
    received = pickle.loads(blob)
    text = "<|im_start|>user\nQ: 12+7=?<|im_end|>"
    ids = toy_tokenizer(text=text, add_special_tokens=False)["input_ids"]
    assert received(text=text, add_special_tokens=False)["input_ids"] == ids
    assert received.decode(ids, skip_special_tokens=False) == toy_tokenizer.decode(ids, skip_special_tokens=False)
    assert not hasattr(received, "image_processor")  # upstream's check for vision-language tokenizers


def test_rng_states_are_saved_per_rank_and_restored(tmp_path):
    from tsdkd_plugin.host.checkpoint import (
        capture_rng_state,
        restore_rank_rng_state,
        restore_rng_state,
        save_rank_rng_state,
    )

    def draws():
        return random.random(), float(numpy.random.rand()), float(torch.rand(()))

    state = capture_rng_state()
    first = draws()
    assert restore_rng_state(state) and draws() == first and not restore_rng_state(None)

    tag_dir = tmp_path / "_actor" / "global_step2"
    tag_dir.mkdir(parents=True)
    (tmp_path / "_actor" / "latest").write_text("global_step2")
    save_rank_rng_state(str(tag_dir), rank=1)
    expected = draws()
    torch.manual_seed(0), random.seed(0), numpy.random.seed(0)  # a fresh process seeds them all
    assert restore_rank_rng_state(str(tmp_path / "_actor"), rank=1) and draws() == expected
    assert not restore_rank_rng_state(str(tmp_path / "_actor"), rank=0)  # a checkpoint without RNG files


@pytest.mark.slow
@pytest.mark.network  # a local Ray instance
def test_one_joiner_actor_joins_each_prompt_as_soon_as_its_samples_are_done():
    """The join runs in one long-lived async actor (a task per prompt made Ray start a worker process
    per prompt on the first rollout, each importing torch): every join comes back in upstream's
    shape, and a prompt whose samples are done is joined while an earlier prompt's are still running
    (upstream's ray.wait loop takes prompts as they finish)."""
    import time

    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=0)
        def one_sample(tag, delay=0.0):
            time.sleep(delay)
            return [{"sample": tag}]

        joiner = seeded_sampling.ResponseJoiner.remote()
        slow = joiner.join.remote(*(one_sample.remote(f"p0s{i}", delay=120.0) for i in range(2)))
        fast = [joiner.join.remote(*(one_sample.remote(f"p{p}s{i}") for i in range(3))) for p in range(1, 9)]
        ready, _ = ray.wait(fast, num_returns=len(fast), timeout=60.0)
        assert len(ready) == len(fast), "the joins waited for an earlier prompt's samples"
        for p, ref in enumerate(fast, start=1):
            assert ray.get(ref) == [{"sample": f"p{p}s{i}"} for i in range(3)]
        assert ray.wait([slow], timeout=0)[0] == []
    finally:
        ray.shutdown()
