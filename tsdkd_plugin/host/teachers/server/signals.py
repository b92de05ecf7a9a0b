"""From a vLLM server's prompt log-probs to the sparse teacher signals the Ray teacher ships.

For each sample the server is asked for the prompt log-probs of prompt + response (vLLM's
`prompt_logprobs`, R per position): at every position its R most likely next tokens with their
log-probs over ALL of the model's logit rows, plus the token that actually follows (which vLLM
always adds). From these, per response position, this module builds what
`teacher_signals_from_logits` builds from full logits (objective/transport.py), on the shared
vocabulary [0, S) = the tokenizer's ids, at temperature 1:

exact (given the server's numbers):
- the top-K log-probs and ids (K <= R) and the tail bucket (the mass outside those K);
- the log-prob of the sampled token, hence the sequence score (its length-normalized log-likelihood);
- the log-prob of every student candidate that is among the R listed tokens.

bounded approximations, where R < the number of logit rows (docs/server_teacher.md):
1. Padding rows. The Ray teacher renormalizes over the shared ids; the server's distribution also
   covers the model's padding rows (ids >= S). The mass of padding rows listed among the R is
   known (m) and removed exactly; unlisted padding rows (each at most the R-th probability p_R)
   are taken to hold nothing. Every log-prob is then too low by log((1 - m) / (1 - m - u)), about
   u, where u <= (padding rows) x p_R is their unlisted mass (~0 for a trained model, whose
   padding rows are never targets; measured in benchmarks/server_teacher_bench.py).
2. Entropy. The unlisted shared mass r is spread over the N unlisted shared ids, each holding at
   most p_R. Its entropy part lies in [L, U] with L = r log(1/p_R) (all of it at p_R) and
   U = r log(N/r) (spread evenly); the estimate is the midpoint, so the error is at most
   (U - L) / 2 = (r/2) log(N p_R / r) (returned per token as `entropy_bound`).
3. Candidates outside the R listed tokens. Their log-prob is unknown (at most log p_R); each gets
   the even share log(r/N). So they rank below every candidate among the R (exact) and, tied among
   themselves, keep the student's own order (the ListMLE's stable sort): the teacher's order
   among them (and against the sampled token when it is listed below the R) is what is missing.
4. If padding rows take some of the first K listed places, fewer than K shared ids are known
   exactly; the missing places are filled with unlisted shared ids at the even share (each off by
   at most p_R).

With R >= the logit rows everything is listed and the signals equal the Ray teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tsdkd_plugin.host.student_step import in_vocab_action_mask
from tsdkd_plugin.host.teachers.server.client import ServerAnswerError
from tsdkd_plugin.objective import TeacherSignals

# A log-prob for "probability 0" that the loss accepts (it must be finite): float16's lowest,
# which is also where the wire format saturates finite log-probs.
ZERO_PROBABILITY_LOGPROB = float(torch.finfo(torch.float16).min)
# Log-probs a little above 0, and masses a little above 1, are float32 rounding in the server.
LOGPROB_SLACK = 1e-3


@dataclass
class ScoringRequest:
    """One sample to score: the tokens the server sees and where its response positions are."""

    tokens: list[int]
    """The sample's real tokens in order (prompt then response; padding removed)."""
    positions: list[int]
    """For each response position the sample is trained on (in-vocabulary action-mask positions, in
    order), the index in `tokens` of the token it predicts (>= 1)."""

    def body(self, model: str, request_top_k: int) -> dict[str, Any]:
        """The /v1/completions request: prompt log-probs of the whole sequence, one generated token
        (vLLM requires at least one; it is ignored)."""
        return {
            "model": model,
            "prompt": self.tokens,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": request_top_k,
        }


def scoring_requests(
    sequences: torch.Tensor, action_mask: torch.Tensor, attention_mask: torch.Tensor, shared_vocab_size: int
) -> tuple[list[ScoringRequest], torch.Tensor]:
    """One ScoringRequest per row of an OpenRLHF micro-batch, and the [B, A] mask of positions
    that get signals (the Ray teacher's: action positions whose sampled id is a real token).

    Alignment (as `student_step.action_positions`): action t of A predicts sequence position
    T - A + t, from everything before it; the server sees the row's attended tokens only."""
    sequences, action_mask, attention_mask = sequences.cpu(), action_mask.cpu(), attention_mask.cpu()
    mask = in_vocab_action_mask(sequences, action_mask, shared_vocab_size)
    batch, length = sequences.shape
    num_actions = action_mask.shape[1]
    attended = attention_mask.bool()
    requests = []
    for row in range(batch):
        compact = attended[row].long().cumsum(0) - 1  # index among the row's attended tokens
        targets = (length - num_actions) + mask[row].nonzero().squeeze(1)
        if targets.numel() and not bool(attended[row, targets].all()):
            raise ValueError(f"row {row}: a response position outside the attention mask; cannot score it remotely")
        positions = compact[targets]
        if positions.numel() and int(positions.min()) < 1:
            raise ValueError(f"row {row}: a response token at the start of the sequence has no context to score")
        requests.append(ScoringRequest(sequences[row][attended[row]].tolist(), positions.tolist()))
    return requests, mask


@dataclass
class ListedLogprobs:
    """The server's answer at the scored positions of a batch, as padded arrays.

    ids [P, E] (-1 where absent), logprobs [P, E] float64 (-inf where absent), sorted by
    descending log-prob; target [P] the id actually at each position. E = request_top_k + 1."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    target: torch.Tensor
    request_top_k: int


def answer_listing(
    answer: Any, request: ScoringRequest, request_top_k: int, url: str = "server", number: int = 0
) -> ListedLogprobs:
    """Parse and check one /v1/completions answer (one prompt) at the request's scored positions.
    Called as each answer arrives, so the parsing overlaps with the server's work on the others."""
    width = request_top_k + 1
    per_position = _prompt_logprobs(answer, len(request.tokens), url, number)
    ids: list[int] = []
    values: list[Any] = []
    try:
        for position in request.positions:
            entry = per_position[position]
            target = str(request.tokens[position])
            if not isinstance(entry, dict) or not request_top_k <= len(entry) <= width or target not in entry:
                count = len(entry) if isinstance(entry, dict) else 0
                raise ServerAnswerError(
                    url,
                    f"sample {number}, position {position}: {count} log-probs "
                    f"{'with' if isinstance(entry, dict) and target in entry else 'without'} the prompt's token "
                    f"{target}; vLLM lists the top {request_top_k} (prompt_logprobs) plus that token",
                )
            for key, item in entry.items():
                ids.append(int(key))
                values.append(item["logprob"])
            pad = width - len(entry)
            if pad:
                ids.extend([-1] * pad)
                values.extend([-math.inf] * pad)
        values_t = torch.tensor(values, dtype=torch.float64)
    except (KeyError, TypeError, ValueError):
        raise ServerAnswerError(
            url, f"sample {number}: a prompt log-prob entry is not {{token id: {{'logprob': number, ...}}}}"
        ) from None
    count = len(request.positions)
    return ListedLogprobs(
        torch.tensor(ids, dtype=torch.long).view(count, width),
        values_t.view(count, width),
        torch.tensor([request.tokens[p] for p in request.positions], dtype=torch.long),
        request_top_k,
    )


def combine_listings(listings: Sequence[ListedLogprobs], url: str = "server") -> ListedLogprobs:
    """One ListedLogprobs over several answers (positions in order), checked and sorted by log-prob."""
    request_top_k = listings[0].request_top_k
    ids = torch.cat([listing.ids for listing in listings])
    values = torch.cat([listing.logprobs for listing in listings])
    count = ids.shape[0]
    if count and bool(torch.isnan(values).any()):
        raise ServerAnswerError(url, "a prompt log-prob is NaN")
    # vLLM clamps -inf to -9999 in JSON; a value above 0, or a position summing above 1, is no log-prob.
    if count and (bool((values > LOGPROB_SLACK).any()) or bool((torch.logsumexp(values, 1) > LOGPROB_SLACK).any())):
        raise ServerAnswerError(
            url,
            "the values are not log-probs (some are > 0 or sum to more than probability 1 at a position): start "
            "the server without --logprobs-mode, or with --logprobs-mode raw_logprobs",
        )
    if count and int(ids.min()) < -1:
        raise ServerAnswerError(url, "a negative token id in the prompt log-probs")
    order = values.sort(dim=1, descending=True, stable=True).indices
    return ListedLogprobs(
        ids.gather(1, order),
        values.gather(1, order),
        torch.cat([listing.target for listing in listings]),
        request_top_k,
    )


def listed_logprobs(
    answers: Sequence[Any], requests: Sequence[ScoringRequest], request_top_k: int, url: str = "server"
) -> ListedLogprobs:
    """Parse and check /v1/completions answers (one per request, one prompt each)."""
    return combine_listings(
        [
            answer_listing(answer, request, request_top_k, url, number)
            for number, (answer, request) in enumerate(zip(answers, requests, strict=True))
        ],
        url,
    )


def _prompt_logprobs(answer: Any, num_tokens: int, url: str, number: int) -> list:
    try:
        choices = answer["choices"]
        if len(choices) != 1:
            raise ServerAnswerError(url, f"sample {number}: {len(choices)} choices for one prompt")
        per_position = choices[0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ServerAnswerError(
            url,
            f"sample {number}: the answer has no choices[0].prompt_logprobs (is this a vLLM OpenAI-compatible server?)",
        ) from None
    if not isinstance(per_position, list) or len(per_position) != num_tokens:
        got = len(per_position) if isinstance(per_position, list) else type(per_position).__name__
        raise ServerAnswerError(
            url, f"sample {number}: prompt_logprobs for {got} positions, the prompt has {num_tokens}"
        )
    return per_position


@dataclass
class ServerSignalStats:
    """How much of the approximation a batch needed (per scored position, means): logged, and
    what the benchmark reports."""

    positions: int = 0
    unlisted_shared_mass: float = 0.0  # r: the teacher's shared mass outside the R listed tokens
    entropy_bound: float = 0.0  # the entropy estimate's worst-case error (nats)
    listed_padding_mass: float = 0.0  # mass on padding rows among the listed tokens (removed exactly)
    filled_top_places: float = 0.0  # shipped top-K places filled for lack of listed shared ids
    unlisted_candidates: float = 0.0  # fraction of the student's candidates not among the listed tokens

    def as_metrics(self, prefix: str = "tsdkd/teacher_server_") -> dict[str, float]:
        names = (
            "unlisted_shared_mass",
            "entropy_bound",
            "listed_padding_mass",
            "filled_top_places",
            "unlisted_candidates",
        )
        return {prefix + name: float(getattr(self, name)) for name in names}


@dataclass
class PositionSignals:
    """Sparse signals for P scored positions (float32/int32, what the wire needs) + the bounds."""

    topk_logprobs: torch.Tensor  # [P, K]
    topk_ids: torch.Tensor  # [P, K]
    tail_logprob: torch.Tensor  # [P]
    entropy: torch.Tensor  # [P]
    entropy_bound: torch.Tensor  # [P] worst-case |entropy - true entropy| (approximation 2)
    target_logprob: torch.Tensor  # [P]
    candidate_logprobs: torch.Tensor | None  # [P, k]
    stats: ServerSignalStats


def position_signals(
    listed: ListedLogprobs, top_k: int, shared_vocab_size: int, candidate_ids: torch.Tensor | None = None
) -> PositionSignals:
    """The signals at each listed position (module docstring), in float64 then rounded to float32.
    candidate_ids: [P, k] the student's candidates at the same positions, or None."""
    shared = shared_vocab_size
    ids, raw = listed.ids, listed.logprobs
    count, width = ids.shape
    if top_k > listed.request_top_k:
        raise ValueError(f"top_k={top_k} exceeds the {listed.request_top_k} log-probs asked of the server")
    present = ids >= 0
    is_shared = present & (ids < shared)
    is_padding = present & (ids >= shared)

    # 1. Padding rows: remove the listed padding mass, renormalize over the shared ids.
    padding_mass = torch.where(is_padding, raw.exp(), 0.0).sum(1)
    log_norm = torch.log1p(-padding_mass.clamp(max=1 - 1e-12))
    logp = torch.where(is_shared, raw - log_norm.unsqueeze(1), -math.inf)  # [P, E] over shared ids
    # p_R, renormalized: every unlisted id holds at most this much. The answer is sorted, so the
    # R-th listed value is column R-1 (the extra entry, the prompt's token, can only be lower).
    bound_logp = raw[:, listed.request_top_k - 1] - log_norm
    listed_p = logp.exp()
    listed_count = is_shared.sum(1)
    unlisted = (1.0 - listed_p.sum(1)).clamp(min=0.0)  # r
    unlisted_ids = (shared - listed_count).double()  # N
    has_tail = (unlisted > 0) & (unlisted_ids > 0)
    safe_r = torch.where(has_tail, unlisted, 1.0)
    safe_n = unlisted_ids.clamp(min=1.0)
    # r / N <= p_R always; float32 rounding in the server can break that by a hair.
    log_bound = torch.maximum(bound_logp, safe_r.log() - safe_n.log())
    log_share = torch.where(
        has_tail, safe_r.log() - safe_n.log(), torch.tensor(ZERO_PROBABILITY_LOGPROB, dtype=torch.float64)
    )

    # 2. Entropy: listed part exactly; the unlisted part's midpoint estimate and its half-width.
    known = -(torch.where(is_shared, listed_p * logp, 0.0)).sum(1)
    lower = safe_r * (-log_bound)
    upper = safe_r * (safe_n.log() - safe_r.log())
    entropy = known + torch.where(has_tail, 0.5 * (lower + upper), 0.0)
    entropy_bound = torch.where(has_tail, 0.5 * (upper - lower).clamp(min=0.0), 0.0)

    # Shipped top-K: the K largest listed shared log-probs (sorted already; shared entries first).
    order = torch.sort(is_shared.to(torch.int8), dim=1, descending=True, stable=True).indices
    top_ids = ids.gather(1, order)[:, :top_k].clone()
    top_logp = logp.gather(1, order)[:, :top_k].clone()
    missing = ~is_shared.gather(1, order)[:, :top_k]  # 4. places without a listed shared id
    filled_rows = missing.any(1).nonzero().squeeze(1).tolist()
    for row in filled_rows:
        taken = set(ids[row][is_shared[row]].tolist())
        fillers = (i for i in range(shared) if i not in taken)
        for place in missing[row].nonzero().squeeze(1).tolist():
            top_ids[row, place] = next(fillers)
            top_logp[row, place] = log_share[row]
    # The tail bucket: the listed shared mass beyond the K shipped, plus the unlisted mass not
    # claimed by fillers. (Not 1 - sum(top K): that would cancel away float32 digits of the
    # server's numbers; with every row listed this sum is exact to them.)
    beyond = listed_p.gather(1, order)[:, top_k:].sum(1)
    share = torch.where(has_tail, log_share.exp(), 0.0)
    tail = beyond + torch.where(has_tail, unlisted - missing.sum(1) * share, 0.0)
    tail_logprob = torch.where(tail > 0, tail.clamp(min=1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))

    # The prompt's own token (always listed by vLLM): its exact log-prob.
    match_target = (ids == listed.target.unsqueeze(1)) & is_shared
    target_logprob = torch.where(match_target, logp, 0.0).sum(1)

    # 3. Candidates: listed -> exact; unlisted -> the even share (ties keep the student's order).
    candidate_logprobs = None
    unlisted_fraction = 0.0
    if candidate_ids is not None:
        cand = candidate_ids.long()
        matches = (cand.unsqueeze(2) == ids.unsqueeze(1)) & is_shared.unsqueeze(1)  # [P, k, E]
        found = matches.any(2)
        exact = torch.where(matches, logp.unsqueeze(1), 0.0).sum(2)
        candidate_logprobs = torch.where(found, exact, log_share.unsqueeze(1)).float()
        unlisted_fraction = float((~found).double().mean()) if count else 0.0

    stats = ServerSignalStats(
        positions=count,
        unlisted_shared_mass=float(unlisted.mean()) if count else 0.0,
        entropy_bound=float(entropy_bound.mean()) if count else 0.0,
        listed_padding_mass=float(padding_mass.mean()) if count else 0.0,
        filled_top_places=float(missing.double().sum(1).mean()) if count else 0.0,
        unlisted_candidates=unlisted_fraction,
    )
    return PositionSignals(
        topk_logprobs=top_logp.float(),
        topk_ids=top_ids.to(torch.int32),
        tail_logprob=tail_logprob.float(),
        entropy=entropy.float(),
        entropy_bound=entropy_bound.float(),
        target_logprob=target_logprob.float(),
        candidate_logprobs=candidate_logprobs,
        stats=stats,
    )


def batch_signals(
    positions: PositionSignals, mask: torch.Tensor, candidate_ids: torch.Tensor | None, temperature: float = 1.0
) -> TeacherSignals:
    """Scatter P positions' signals into a micro-batch's [B, A, ...] TeacherSignals (zeros off the
    mask, as the Ray teacher leaves them), with the sequence scores (mean log-prob of the sampled
    response tokens, over the same positions the Ray teacher averages)."""
    bsz, num_actions = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(1)
    top_k = positions.topk_ids.shape[1]

    def scatter(values: torch.Tensor, *trailing: int) -> torch.Tensor:
        out = torch.zeros(bsz * num_actions, *trailing, dtype=values.dtype)
        out[flat] = values
        return out.view(bsz, num_actions, *trailing)

    token_logprob = scatter(positions.target_logprob)
    lengths = mask.float().sum(1)
    candidates = None
    if candidate_ids is not None:
        candidates = candidate_ids.to(torch.int32).cpu()
    return TeacherSignals(
        topk_logprobs=scatter(positions.topk_logprobs, top_k),
        topk_ids=scatter(positions.topk_ids, top_k),
        tail_logprob=scatter(positions.tail_logprob),
        entropy=scatter(positions.entropy),
        temperature=float(temperature),
        candidate_ids=candidates,
        candidate_logprobs=None if candidates is None else scatter(positions.candidate_logprobs, candidates.shape[-1]),
        sequence_scores=token_logprob.sum(1) / lengths.clamp_min(1),
    )


def signals_from_answers(
    answers: Sequence[Any],
    requests: Sequence[ScoringRequest],
    mask: torch.Tensor,
    candidate_ids: torch.Tensor | None,
    *,
    top_k: int,
    request_top_k: int,
    shared_vocab_size: int,
    url: str = "server",
) -> tuple[TeacherSignals, ServerSignalStats]:
    """A micro-batch's TeacherSignals (sparse, tau = 1) from its /v1/completions answers."""
    return signals_from_listings(
        [
            answer_listing(answer, request, request_top_k, url, number)
            for number, (answer, request) in enumerate(zip(answers, requests, strict=True))
        ],
        mask,
        candidate_ids,
        top_k=top_k,
        shared_vocab_size=shared_vocab_size,
        url=url,
    )


def signals_from_listings(
    listings: Sequence[ListedLogprobs],
    mask: torch.Tensor,
    candidate_ids: torch.Tensor | None,
    *,
    top_k: int,
    shared_vocab_size: int,
    url: str = "server",
) -> tuple[TeacherSignals, ServerSignalStats]:
    """A micro-batch's TeacherSignals from its samples' parsed answers (`answer_listing`, in row order)."""
    listed = combine_listings(listings, url)
    flat_candidates = None
    if candidate_ids is not None:
        flat_candidates = candidate_ids.cpu()[mask]  # [P, k], positions in the same (row-major) order
    positions = position_signals(listed, top_k, shared_vocab_size, flat_candidates)
    return batch_signals(positions, mask, candidate_ids), positions.stats
