"""The server teacher's conversion (host/teachers/server/signals.py): vLLM's prompt log-probs of a
micro-batch -> the sparse teacher signals, against `teacher_signals_from_logits` on the same
logits (what the Ray teacher group computes), on OpenRLHF's right-padded batch layout.

- every logit row listed (R >= rows): every field equals the Ray teacher's (float32 rounding);
- R < rows: the exact fields stay exact, the entropy is within its stated bound of the truth (and
  the truth within [L, U]), listed candidates are exact and rank as the teacher ranks them,
  unlisted ones rank below them in the student's order; padding rows' unlisted mass u moves
  log-probs by log((1 - m)/(1 - m - u)) (m: the listed padding mass);
- padding rows crowding the top: fewer shared ids than K listed -> distinct fillers, a valid loss;
- malformed answers are named.
No server, no Ray: answers are emulated from the logits (server_teacher/emulation.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from tsdkd_plugin.host.student_step import action_positions, in_vocab_action_mask
from tsdkd_plugin.host.teachers.server.client import ServerAnswerError
from tsdkd_plugin.host.teachers.server.emulation import prompt_logprobs_answer
from tsdkd_plugin.host.teachers.server.signals import (
    listed_logprobs,
    position_signals,
    scoring_requests,
    signals_from_answers,
)
from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, teacher_signals_from_logits, tsdkd_loss

ROWS, SHARED, K, CANDIDATES = 96, 80, 8, 5
LENGTHS = (14, 9, 7, 12)  # prompt + response per row; prompts of 3-4 tokens
TOL = 2e-5


def make_batch(seed: int = 0, oov: bool = True):
    """OpenRLHF 0.11.2's layout: rows right-padded, attention_mask marks real tokens, action_mask
    [B, T-1] marks response tokens (action t predicts token t + 1)."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(LENGTHS), max(LENGTHS)
    sequences = torch.randint(0, SHARED, (batch, length), generator=g)
    attention = torch.zeros(batch, length, dtype=torch.long)
    action = torch.zeros(batch, length - 1, dtype=torch.bool)
    for row, size in enumerate(LENGTHS):
        attention[row, :size] = 1
        sequences[row, size:] = 0
        action[row, 2 + row % 2 : size - 1] = True
    if oov:
        sequences[1, 5] = SHARED + 3  # a sampled padding-row id: no signals there, as the Ray teacher
    candidates = torch.stack([torch.randperm(SHARED, generator=g)[:CANDIDATES] for _ in range(action.numel())])
    return sequences, attention, action, candidates.view(*action.shape, CANDIDATES)


def make_model(seed: int = 1, padding_shift: float = 0.0, scale: float = 3.0):
    """A deterministic 'model': logits of position i from the tokens up to i (a table + a running mean),
    so every prefix matters. padding_shift moves the padding rows' logits."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(ROWS, ROWS, generator=g) * scale
    table[:, SHARED:] += padding_shift

    def logits_of(tokens):
        rows = table[torch.tensor(tokens)]
        return rows + rows.cumsum(0) / torch.arange(1, len(tokens) + 1).unsqueeze(1) * 0.5

    return logits_of


def server_signals(logits_of, batch, request_top_k, top_k=K):
    sequences, attention, action, candidates = batch
    requests, mask = scoring_requests(sequences, action, attention, SHARED)
    answers = [prompt_logprobs_answer(logits_of(r.tokens), r.tokens, request_top_k) for r in requests]
    signals, stats = signals_from_answers(
        answers, requests, mask, candidates, top_k=top_k, request_top_k=request_top_k, shared_vocab_size=SHARED
    )
    return signals, stats, mask, (answers, requests)


def ray_teacher_signals(logits_of, batch, top_k=K):
    """What the Ray teacher group computes from the same model's logits (teacher_signals_from_logits
    at the positions `response_hidden_states` gives: action_positions)."""
    sequences, attention, action, candidates = batch
    full = torch.stack(
        [
            torch.cat(
                [
                    logits_of(sequences[r][attention[r].bool()].tolist()),
                    torch.zeros(int((attention[r] == 0).sum()), ROWS),
                ]
            )
            for r in range(len(sequences))
        ]
    )
    mask = in_vocab_action_mask(sequences, action, SHARED)
    config = TSDKDConfig(sparse_top_k=top_k, num_candidates=CANDIDATES)
    return teacher_signals_from_logits(
        action_positions(full, action.shape[1]),
        config,
        mask=mask,
        shared_vocab_size=SHARED,
        candidate_ids=candidates,
        sampled_ids=sequences[:, 1:].masked_fill(~mask, 0),
    ), full


def true_distribution(full, action, mask):
    """float64 log-probs over the shared ids at the scored positions [P, SHARED]."""
    rows = action_positions(full, action.shape[1])[mask].double()
    return torch.log_softmax(rows[:, :SHARED], dim=-1)


def test_every_row_listed_gives_the_ray_teachers_signals():
    logits_of, batch = make_model(), make_batch()
    got, stats, mask, _ = server_signals(logits_of, batch, request_top_k=ROWS)
    want, _ = ray_teacher_signals(logits_of, batch)
    assert mask.sum() > 20 and not mask[1, 4]  # the out-of-vocabulary sample gets no signals
    assert stats.unlisted_shared_mass < 1e-6 and stats.entropy_bound == 0 and stats.listed_padding_mass > 0.01
    for name, value in want.tensors().items():
        ours = got.tensors()[name]
        if name in ("topk_ids", "candidate_ids"):
            assert torch.equal(ours[mask], value[mask].to(ours.dtype)), name
        elif name == "sequence_scores":
            assert (ours - value).abs().max() < TOL, name
        else:
            assert (ours[mask].double() - value[mask].double()).abs().max() < TOL, name
    # the loss the actors compute is the same
    student = torch.randn(*mask.shape, ROWS, generator=torch.Generator().manual_seed(5))
    config = TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES, indirect_level="both")
    sampled = batch[0][:, 1:].masked_fill(~mask, 0)
    ours_loss, _ = tsdkd_loss(
        student,
        TeacherSignals.from_wire(got.to_wire(), 1.0),
        mask,
        config,
        shared_vocab_size=SHARED,
        sampled_ids=sampled,
        group_size=2,
    )
    want_loss, _ = tsdkd_loss(
        student,
        TeacherSignals.from_wire(want.to_wire(), 1.0),
        mask,
        config,
        shared_vocab_size=SHARED,
        sampled_ids=sampled,
        group_size=2,
    )
    assert abs(float(ours_loss) - float(want_loss)) < 1e-5


@pytest.mark.parametrize("request_top_k", [K, 12, 24])
def test_fewer_listed_log_probs_stay_exact_or_within_their_bounds(request_top_k):
    """Padding rows far below (a trained model): no padding mass anywhere, so only the entropy and
    the unlisted candidates are approximated."""
    logits_of, batch = make_model(padding_shift=-40.0), make_batch()
    got, stats, mask, (answers, requests) = server_signals(logits_of, batch, request_top_k)
    want, full = ray_teacher_signals(logits_of, batch)
    t = {name: value[mask] if value.dim() >= 2 else value for name, value in got.tensors().items()}
    w = {name: value[mask] if value.dim() >= 2 else value for name, value in want.tensors().items()}
    assert (t["topk_logprobs"].double() - w["topk_logprobs"].double()).abs().max() < TOL
    # the tail's mass is 1 - (the listed mass): exact to the float32 digits the server sends
    assert (t["tail_logprob"].double().exp() - w["tail_logprob"].double().exp()).abs().max() < 1e-6
    assert torch.equal(t["topk_ids"], w["topk_ids"].to(t["topk_ids"].dtype))
    assert (got.sequence_scores - want.sequence_scores).abs().max() < TOL

    # entropy: |estimate - truth| <= bound, and the truth within [L, U] (the bound is attained by them)
    logp = true_distribution(full, batch[2], mask)
    listed = listed_logprobs(answers, requests, request_top_k)
    signals = position_signals(listed, K, SHARED, batch[3][mask])
    truth = -(logp.exp() * logp).sum(1)
    error = (signals.entropy.double() - truth).abs()
    assert bool((error <= signals.entropy_bound.double() + 1e-5).all()), (error - signals.entropy_bound).max()
    assert stats.entropy_bound > 0 and float(error.mean()) < stats.entropy_bound

    # candidates: exact when listed; the order the ListMLE reads agrees with the truth on the listed
    # ones, which all rank above the unlisted ones (kept in the student's order)
    candidates = batch[3][mask]
    true_scores = logp.gather(1, candidates.long())
    # the top R listed (the answer is sorted; the prompt's own token may follow them, below p_R)
    top_ids = [set(listed.ids[p][:request_top_k].tolist()) for p in range(len(candidates))]
    all_ids = [set(listed.ids[p].tolist()) for p in range(len(candidates))]
    in_answer = torch.tensor([[int(c) in all_ids[p] for c in candidates[p]] for p in range(len(candidates))])
    is_listed = torch.tensor([[int(c) in top_ids[p] for c in candidates[p]] for p in range(len(candidates))])
    assert 0 < float(is_listed.double().mean()) < 1
    ours = signals.candidate_logprobs.double()
    assert (ours[in_answer] - true_scores[in_answer]).abs().max() < TOL
    for p in range(len(candidates)):
        order = torch.sort(ours[p], descending=True, stable=True).indices
        n_listed = int(is_listed[p].sum())
        assert bool(is_listed[p][order[:n_listed]].all())
        true_order = torch.sort(true_scores[p][is_listed[p]], descending=True, stable=True).indices
        assert torch.equal(order[:n_listed], is_listed[p].nonzero().squeeze(1)[true_order])
        unlisted = [i for i in order[n_listed:].tolist() if not in_answer[p, i]]
        assert unlisted == sorted(unlisted)  # tied: the student's own order
        if n_listed:
            assert bool((ours[p][~is_listed[p]] <= ours[p][is_listed[p]].min()).all())


def test_unlisted_padding_mass_is_bounded():
    """An untrained model spreads mass over its padding rows too. With R < rows the unlisted padding
    mass u is taken as 0: every log-prob is then too low by log((1-m)/(1-m-u)), m the listed padding
    mass (removed exactly)."""
    logits_of, batch = make_model(scale=0.5), make_batch()
    got, _, mask, (answers, requests) = server_signals(logits_of, batch, request_top_k=12)
    _, full = ray_teacher_signals(logits_of, batch)
    rows = action_positions(full, batch[2].shape[1])[mask].double()
    raw = torch.log_softmax(rows, dim=-1)
    listed = listed_logprobs(answers, requests, 12)
    padding_listed = torch.zeros(len(rows))
    for p in range(len(rows)):
        ids = listed.ids[p]
        padding_listed[p] = raw[p, ids[ids >= SHARED]].exp().sum()
    unlisted_padding = raw[:, SHARED:].exp().sum(1) - padding_listed.double()
    assert float(unlisted_padding.min()) > 0.01  # the case this test is about
    shift = torch.log1p(-padding_listed.double()) - torch.log1p(-padding_listed.double() - unlisted_padding)
    true = torch.log_softmax(rows[:, :SHARED], dim=-1)
    top = got.topk_logprobs[mask].double()
    true_top = true.gather(1, got.topk_ids[mask].long())
    assert bool(((true_top - top) <= shift.unsqueeze(1) + 1e-5).all()) and bool((true_top >= top - 1e-5).all())


def test_padding_rows_crowding_the_top_are_replaced_by_distinct_fillers():
    logits_of, batch = make_model(padding_shift=12.0), make_batch()
    got, stats, mask, _ = server_signals(logits_of, batch, request_top_k=K)
    assert stats.filled_top_places > 1 and stats.listed_padding_mass > 0.5
    ids = got.topk_ids[mask]
    assert bool((ids < SHARED).all()) and all(len(set(row.tolist())) == K for row in ids)
    config = TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES)
    student = torch.randn(*mask.shape, ROWS, generator=torch.Generator().manual_seed(6))
    loss, _ = tsdkd_loss(student, TeacherSignals.from_wire(got.to_wire(), 1.0), mask, config, shared_vocab_size=SHARED)
    assert math.isfinite(float(loss))


def answer_for(request_top_k=6):
    logits_of, batch = make_model(), make_batch(oov=False)
    requests, mask = scoring_requests(batch[0], batch[2], batch[1], SHARED)
    answers = [prompt_logprobs_answer(logits_of(r.tokens), r.tokens, request_top_k) for r in requests]
    return answers, requests, mask, batch


def broken(kind):
    answers, requests, _, _ = answer_for()
    per_position = answers[0]["choices"][0]["prompt_logprobs"]
    position = requests[0].positions[0]
    if kind == "short":
        per_position.pop()
    elif kind == "no_choices":
        answers[0] = {"object": "error"}
    elif kind == "without_target":
        per_position[position].pop(str(requests[0].tokens[position]))
    elif kind == "not_a_number":
        next(iter(per_position[position].values()))["logprob"] = "high"
    elif kind == "logits":
        answers[0] = prompt_logprobs_answer(
            torch.randn(len(requests[0].tokens), ROWS) + 5, requests[0].tokens, 6, as_logits=True
        )
    return answers, requests


@pytest.mark.parametrize(
    "kind, words",
    [
        ("short", "prompt_logprobs for"),
        ("no_choices", r"no choices\[0\]\.prompt_logprobs"),
        ("without_target", "without the prompt's token"),
        ("not_a_number", "is not {token id: {.logprob.: number"),
        ("logits", "not log-probs"),
    ],
)
def test_malformed_answers_are_named(kind, words):
    answers, requests = broken(kind)
    with pytest.raises(ServerAnswerError, match=words):
        listed_logprobs(answers, requests, 6, "http://teacher:8000")


def test_requests_send_each_rows_real_tokens_and_point_at_its_response():
    sequences, attention, action, _ = make_batch()
    requests, mask = scoring_requests(sequences, action, attention, SHARED)
    for row, request in enumerate(requests):
        assert request.tokens == sequences[row, : LENGTHS[row]].tolist()
        targets = [t + 1 for t in mask[row].nonzero().squeeze(1).tolist()]  # action t predicts token t + 1
        assert request.positions == targets
        body = request.body("teacher", 24)
        assert body["prompt"] == request.tokens and body["prompt_logprobs"] == 24 and body["max_tokens"] == 1
