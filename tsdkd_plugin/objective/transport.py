"""How the teacher reaches the loss: one dataclass, dense or sparse.

Alignment convention for every [B, T, ...] tensor: position t holds the
distribution that predicts response token t (the caller shifts); mask [B, T] is 1
on response tokens. All distributions live on the shared token ids
[0, shared_vocab_size): models with the same tokenizer may have a different
number of logit rows (Qwen2.5-1.5B 151,936 vs Qwen2.5-14B 152,064 for 151,665
tokens); rows past the tokenizer are padding, not tokens, and are dropped before
the softmax.

Dense (teacher colocated): full teacher logits [B, T, Vt], or teacher hidden
states [B, T, Ht] with its lm_head weight [Vt, Ht] (logits made chunk by chunk).

Sparse (teacher elsewhere): per token the teacher's top-K log-probs at tau and
their ids, the log of its remaining mass (one tail bucket), its exact entropy,
and its log-probs at the student's k candidate ids (ids fixed at experience time
and carried along), plus one sequence score per response. Built by
teacher_signals_from_logits / teacher_signals_from_hidden below (the teacher's side);
`to_wire` / `from_wire` are the encoding it travels in: 6K + 6k + 6 bytes per token
(float16 log-probs, int32 ids) instead of 2*V for bf16 logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .chunking import IDENTITY_HEAD, HiddenRows, LogitsRows, OutputHead
from .config import TSDKDConfig
from .entropy import entropy_from_logprobs
from .errors import NonFiniteInputError
from .selective_jsd import log_tail_mass

SPARSE_FIELDS = ("topk_logprobs", "topk_ids", "tail_logprob", "entropy")


@dataclass
class TeacherSignals:
    """What the loss knows about the teacher. Fill exactly one of the three groups."""

    # -- dense, logits (teacher colocated, logits already computed) --
    logits: torch.Tensor | None = None
    """[B, T, Vt] teacher logits (any float dtype; compared in float32)."""

    # -- dense, hidden states (teacher colocated; logits made chunk by chunk) --
    hidden: torch.Tensor | None = None
    """[B, T, Ht] teacher final hidden states (after the final norm)."""
    lm_head_weight: torch.Tensor | None = None
    """[Vt, Ht] teacher output embedding."""
    output_head: OutputHead = IDENTITY_HEAD
    """What the teacher's family does after `hidden @ lm_head_weight.T` (e.g. Gemma-2's logit
    softcapping); used with `hidden` only."""

    # -- sparse (teacher remote) --
    topk_logprobs: torch.Tensor | None = None
    """[B, T, K] teacher log-probs at `temperature` of its top-K shared token ids."""
    topk_ids: torch.Tensor | None = None
    """[B, T, K] those ids (int32 on the wire; distinct per token)."""
    tail_logprob: torch.Tensor | None = None
    """[B, T] log of the teacher's mass outside the top-K (-inf when K is the whole vocabulary)."""
    entropy: torch.Tensor | None = None
    """[B, T] teacher entropy at `temperature` over its full shared distribution."""
    temperature: float | None = None
    """Temperature the sparse fields were computed at; must equal the loss's tau."""

    # -- either transport --
    candidate_ids: torch.Tensor | None = None
    """[B, T, k] the student's top-k ids fixed at experience time. Required with
    the sparse transport for the token-level ListMLE; optional with dense (default:
    the student's current top-k, identical on-policy)."""
    candidate_logprobs: torch.Tensor | None = None
    """[B, T, k] teacher log-probs at candidate_ids (sparse; only their order matters)."""
    sequence_scores: torch.Tensor | None = None
    """[B] teacher score per response for the sequence-level ListMLE. Default with
    dense: the length-normalized teacher log-likelihood at tau."""

    def __post_init__(self) -> None:
        dense_logits = self.logits is not None
        dense_hidden = self.hidden is not None or self.lm_head_weight is not None
        sparse = any(getattr(self, name) is not None for name in SPARSE_FIELDS)
        if dense_logits + dense_hidden + sparse != 1:
            raise ValueError(
                "TeacherSignals: fill exactly one transport: `logits` (dense), `hidden` + "
                "`lm_head_weight` (dense), or the sparse fields " + ", ".join(SPARSE_FIELDS)
            )
        if dense_hidden and (self.hidden is None or self.lm_head_weight is None):
            raise ValueError("TeacherSignals: the hidden-state transport needs both `hidden` and `lm_head_weight`")
        if sparse:
            missing = [name for name in SPARSE_FIELDS if getattr(self, name) is None]
            if missing:
                raise ValueError(f"TeacherSignals: the sparse transport is missing {missing}")
            if self.temperature is None:
                raise ValueError("TeacherSignals: the sparse transport needs `temperature` (the tau of its log-probs)")
            if self.candidate_logprobs is not None and self.candidate_ids is None:
                raise ValueError("TeacherSignals: `candidate_logprobs` given without `candidate_ids`")
        elif self.candidate_logprobs is not None:
            raise ValueError("TeacherSignals: `candidate_logprobs` belongs to the sparse transport")

    @property
    def kind(self) -> str:
        """'logits', 'hidden' or 'sparse'."""
        if self.logits is not None:
            return "logits"
        if self.hidden is not None:
            return "hidden"
        return "sparse"

    @property
    def vocab_rows(self) -> int | None:
        """Teacher logit rows (dense) or None (sparse)."""
        if self.logits is not None:
            return self.logits.shape[-1]
        if self.lm_head_weight is not None:
            return self.lm_head_weight.shape[0]
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes this object's tensors take as they are (see wire_nbytes for the shipped size)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- the wire format of the sparse transport ------------------------------------------------
    def to_wire(self) -> dict[str, torch.Tensor]:
        """The sparse signals as shipped from the teacher group to the actors (same field names).

        Log-probs (top-K, tail, candidates) travel as float16: rounding a log-prob to 11
        significant bits changes its probability by at most 0.1% above log-prob -4 (p > 1.8%,
        where the mass is), 0.8% down to -32, and float16 stays finite down to -65504
        (bfloat16 keeps 8 bits: up to 0.8% above -4 and 6% near -30).
        The entropy and the sequence scores stay float32 (the gate and the ranking of a prompt's
        responses read small differences of them); ids are int32. The student's candidates are
        sent in the teacher's order (a stable sort of their float32 log-probs), so the rounding
        can create ties but never reorder them: the ListMLE reads exactly the teacher's ranking.
        Per response token: 6K + 6k + 6 bytes (k candidates), plus 4 per response.
        """
        if self.kind != "sparse":
            raise ValueError("TeacherSignals.to_wire: only the sparse transport is shipped; dense signals stay local")
        wire = {
            "topk_logprobs": _wire_logprob(self.topk_logprobs),
            "topk_ids": self.topk_ids.to(torch.int32),
            "tail_logprob": _wire_logprob(self.tail_logprob),
            "entropy": self.entropy.to(torch.float32),
        }
        if self.candidate_ids is not None:
            if self.candidate_logprobs is None:
                wire["candidate_ids"] = self.candidate_ids.to(torch.int32)
            else:
                order = torch.sort(self.candidate_logprobs.float(), dim=-1, descending=True, stable=True).indices
                wire["candidate_ids"] = self.candidate_ids.gather(-1, order).to(torch.int32)
                wire["candidate_logprobs"] = _wire_logprob(self.candidate_logprobs.gather(-1, order))
        if self.sequence_scores is not None:
            wire["sequence_scores"] = self.sequence_scores.to(torch.float32)
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, torch.Tensor], temperature: float) -> TeacherSignals:
        """Sparse signals from `to_wire`'s dict (float fields back to float32; ids as sent).

        temperature: the tau the teacher used (the loss checks it against its own)."""
        unknown = set(wire) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TeacherSignals.from_wire: unknown fields {sorted(unknown)}")
        values = {name: (t.float() if t.is_floating_point() else t) for name, t in wire.items()}
        return cls(**values, temperature=float(temperature))


_FLOAT16_LOWEST = float(torch.finfo(torch.float16).min)


def _wire_logprob(logprob: torch.Tensor) -> torch.Tensor:
    """float16 log-probs; finite values below float16's range saturate at its lowest (a probability
    of exactly 0 either way) instead of becoming -inf, and -inf (an empty tail) stays -inf."""
    finite_low = logprob.float().clamp_min(_FLOAT16_LOWEST)
    return torch.where(torch.isneginf(logprob), logprob.float(), finite_low).to(torch.float16)


def check_shared_vocab(shared_vocab_size, student_rows: int | None, teacher_rows: int | None) -> int:
    """Validate the shared token-id range against both models' logit row counts."""
    if isinstance(shared_vocab_size, bool) or not isinstance(shared_vocab_size, int) or shared_vocab_size < 1:
        raise ValueError(f"shared_vocab_size must be an integer >= 1, got {shared_vocab_size!r}")
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows is not None and shared_vocab_size > rows:
            raise ValueError(
                f"shared_vocab_size={shared_vocab_size} exceeds the {who}'s {rows} logit rows; it must be "
                f"<= min(student rows, teacher rows) (the tokenizer's length, e.g. 151665 for Qwen2.5)"
            )
    return shared_vocab_size


def _teacher_signals(
    source,
    batch_shape: tuple[int, int],
    device: torch.device,
    config: TSDKDConfig,
    mask: torch.Tensor,
    shared: int,
    candidate_ids: torch.Tensor | None,
    sampled_ids: torch.Tensor | None,
    source_name: str,
) -> TeacherSignals:
    bsz, seqlen = batch_shape
    if tuple(mask.shape) != (bsz, seqlen):
        raise ValueError(f"mask must have shape [B, T] = {[bsz, seqlen]}, got {list(mask.shape)}")
    top_k = config.sparse_top_k
    if top_k > shared:
        raise ValueError(f"TSDKDConfig.sparse_top_k={top_k} must be <= shared_vocab_size={shared}")
    for name, ids, trailing in (("candidate_ids", candidate_ids, 1), ("sampled_ids", sampled_ids, 0)):
        if ids is None:
            continue
        if tuple(ids.shape[:2]) != (bsz, seqlen) or ids.dim() != 2 + trailing or ids.device != device:
            raise ValueError(f"{name} must be a [B, T{', k' if trailing else ''}] tensor on {device}")
        picked = ids[mask.bool()]
        if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= shared):
            raise ValueError(f"{name} must lie in [0, shared_vocab_size={shared}) on response tokens")

    positions = mask.reshape(-1).nonzero().squeeze(1)
    num = positions.numel()
    tau = config.temperature
    out_topk = torch.zeros(bsz * seqlen, top_k, dtype=torch.float32, device=device)
    out_ids = torch.zeros(bsz * seqlen, top_k, dtype=torch.int32, device=device)
    out_tail = torch.zeros(bsz * seqlen, dtype=torch.float32, device=device)
    out_entropy = torch.zeros(bsz * seqlen, dtype=torch.float32, device=device)
    k = candidate_ids.shape[-1] if candidate_ids is not None else 0
    out_cand = torch.zeros(bsz * seqlen, k, dtype=torch.float32, device=device)
    token_logprob = torch.zeros(bsz * seqlen, dtype=torch.float32, device=device)
    cand_flat = candidate_ids.reshape(-1, k).long() if candidate_ids is not None else None
    sampled_flat = sampled_ids.reshape(-1).long() if sampled_ids is not None else None

    chunk = min(config.chunk_size, max(num, 1))
    logp = torch.empty(chunk, shared, dtype=torch.float32, device=device)
    scratch = torch.empty_like(logp)
    for start in range(0, num, chunk):
        index = slice(start, min(start + chunk, num))
        rows = positions[index]
        c = rows.numel()
        buf, work = logp[:c], scratch[:c]
        source.fill(index, buf)
        if tau != 1.0:
            buf.div_(tau)
        buf.sub_(torch.logsumexp(buf, dim=1, keepdim=True))
        torch.exp(buf, out=work)
        entropy = entropy_from_logprobs(buf, work, scratch=work)  # work is reused below
        # NaN or +-inf anywhere in a row makes its entropy NaN (inf - inf, 0 * -inf).
        if not bool(torch.isfinite(entropy).all()):
            raise NonFiniteInputError(f"{source_name} contains NaN or inf; teacher inputs must be finite")
        out_entropy[rows] = entropy
        top_vals, top_ids = torch.topk(buf, top_k, dim=1)
        out_topk[rows] = top_vals
        out_ids[rows] = top_ids.to(torch.int32)
        out_tail[rows] = log_tail_mass(buf, top_ids, work)
        if cand_flat is not None:
            out_cand[rows] = buf.gather(1, cand_flat[rows])
        if sampled_flat is not None:
            token_logprob[rows] = buf.gather(1, sampled_flat[rows].unsqueeze(1)).squeeze(1)

    sequence_scores = None
    if sampled_ids is not None:
        lengths = mask.reshape(bsz, seqlen).float().sum(1)
        sequence_scores = token_logprob.view(bsz, seqlen).sum(1) / lengths.clamp_min(1)
    return TeacherSignals(
        topk_logprobs=out_topk.view(bsz, seqlen, top_k),
        topk_ids=out_ids.view(bsz, seqlen, top_k),
        tail_logprob=out_tail.view(bsz, seqlen),
        entropy=out_entropy.view(bsz, seqlen),
        temperature=float(tau),
        candidate_ids=candidate_ids.to(torch.int32) if candidate_ids is not None else None,
        candidate_logprobs=out_cand.view(bsz, seqlen, k) if candidate_ids is not None else None,
        sequence_scores=sequence_scores,
    )


@torch.no_grad()
def teacher_signals_from_logits(
    teacher_logits: torch.Tensor,
    config: TSDKDConfig,
    *,
    mask: torch.Tensor,
    shared_vocab_size: int,
    candidate_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
) -> TeacherSignals:
    """Teacher side of the sparse transport, from teacher logits [B, T, Vt].

    Computes, over the shared vocabulary at config.temperature and for the
    response tokens only (other positions are zero): top-K (config.sparse_top_k)
    log-probs and ids, log tail mass, entropy, log-probs at candidate_ids
    [B, T, k] if given, and, if sampled_ids [B, T] is given, the sequence score
    (mean log-prob of the sampled response tokens). Works chunk by chunk over tokens.
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [B, T, V], got shape {list(teacher_logits.shape)}")
    shared = check_shared_vocab(shared_vocab_size, None, teacher_logits.shape[-1])
    positions = mask.reshape(-1).nonzero().squeeze(1) if mask.dim() == 2 else None
    if positions is None:
        raise ValueError(f"mask must have shape [B, T], got {list(mask.shape)}")
    source = LogitsRows(teacher_logits, positions, shared)
    return _teacher_signals(
        source, tuple(teacher_logits.shape[:2]), teacher_logits.device, config, mask,
        shared, candidate_ids, sampled_ids, "teacher_logits",
    )  # fmt: skip


@torch.no_grad()
def teacher_signals_from_hidden(
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    config: TSDKDConfig,
    *,
    mask: torch.Tensor,
    shared_vocab_size: int,
    candidate_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    output_head: OutputHead = IDENTITY_HEAD,
) -> TeacherSignals:
    """Same as teacher_signals_from_logits, from hidden states [B, T, H] and lm_head
    weight [Vt, H]; logits = output_head(hidden @ W.T) exist only for config.chunk_size
    tokens at a time."""
    if teacher_hidden.dim() != 3 or teacher_lm_head_weight.dim() != 2:
        raise ValueError("teacher_hidden must be [B, T, H] and teacher_lm_head_weight [V, H]")
    if teacher_hidden.shape[-1] != teacher_lm_head_weight.shape[-1]:
        raise ValueError(
            f"teacher hidden size {teacher_hidden.shape[-1]} != lm_head_weight columns {teacher_lm_head_weight.shape[-1]}"
        )
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {list(mask.shape)}")
    shared = check_shared_vocab(shared_vocab_size, None, teacher_lm_head_weight.shape[0])
    positions = mask.reshape(-1).nonzero().squeeze(1)
    hidden_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, positions)
    source = HiddenRows(hidden_rows, teacher_lm_head_weight, shared, output_head)
    return _teacher_signals(
        source, tuple(teacher_hidden.shape[:2]), teacher_hidden.device, config, mask,
        shared, candidate_ids, sampled_ids, "teacher hidden states / lm_head_weight",
    )  # fmt: skip
