"""Where a chunk of logit rows comes from, and where its gradient goes.

The objective (engine.py) never holds a [tokens x vocab] matrix: it asks a row
source for the logits of a few hundred tokens at a time, over the shared
vocabulary, already in the compute dtype. Two sources, one interface:

- LogitsRows:  rows of an existing [B, T, V] logits tensor (plain entry point,
               dense teacher logits);
- HiddenRows:  hidden [N, H] @ lm_head_weight[:shared].T computed per chunk (the
               fused entry point, the Liger-Kernel idea; also the teacher's side).

The student's sources also take gradients w.r.t. those logit rows and turn them
into gradients of what they were computed from, chunk by chunk: the logits
tensor itself (StudentLogits) or hidden states and lm_head weight (StudentHidden,
via G @ W and G^T @ h accumulated in place, so the weight gradient needs no
per-chunk [V, H] temporary when dtypes match).

`index` is either a slice of the valid-token list (a contiguous chunk) or a
LongTensor of positions in it (the correction pass works on a subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Index = slice | torch.Tensor


@dataclass(frozen=True)
class OutputHead:
    """What a model family does to `hidden @ W.T` before its logits are returned.

        logits = softcap(scale * (hidden @ W.T)),   softcap(z) = cap * tanh(z / cap)  (when `softcap` is set)

    Qwen2 / Qwen2.5 / Qwen3 / Llama: the identity (the default). Gemma-2: softcap =
    config.final_logit_softcapping (30.0). Other families scale their logits (Cohere's
    `logit_scale`, Granite's `1 / logits_scaling`). Hidden states that are turned into logits
    by hand must go through the same head, or every distribution built from them is wrong.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"OutputHead.scale must be a finite real > 0, got {self.scale!r}")
        if self.softcap is not None and (
            not isinstance(self.softcap, (int, float)) or isinstance(self.softcap, bool)
            or not math.isfinite(self.softcap) or self.softcap <= 0
        ):
            raise ValueError(f"OutputHead.softcap must be None or a finite real > 0, got {self.softcap!r}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """logits <- head(logits) in place (logits are the raw `hidden @ W.T`); returns logits."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def raw_grad_from_logits_(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """dL/d(hidden @ W.T) from dL/dlogits, written into `logits` (the head's outputs, overwritten).

        d logits / d raw = scale * (1 - tanh^2) = scale * (1 - (logits / cap)^2) with a softcap.
        """
        if self.softcap is None:
            return torch.mul(grad, self.scale, out=logits)
        logits.div_(self.softcap).square_().neg_().add_(1.0).mul_(grad)
        return logits.mul_(self.scale) if self.scale != 1.0 else logits

    def raw_grad_from_raw(self, grad: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """dL/d raw from dL/dlogits at a few entries whose raw `hidden @ W.T` values are known:
        scale / cosh^2(scale * raw / cap) with a softcap (exact even where tanh saturates)."""
        if self.softcap is None:
            return grad * self.scale
        return grad * (self.scale / torch.cosh(raw * (self.scale / self.softcap)).square())


IDENTITY_HEAD = OutputHead()


@dataclass
class ChunkRows:
    """A chunk's student rows as the engine holds them when it hands their gradient over.

    logprobs: [C, V] log-softmax of logits / tau (in place of the logits); lse: [C, 1] the
    log-sum-exp it subtracted, so logits = tau * (logprobs + lse); scratch: a free [C, V] buffer.
    """

    logprobs: torch.Tensor
    lse: torch.Tensor
    tau: float
    scratch: torch.Tensor


class LogitsRows:
    """Rows of logits [B, T, V] at the valid positions, columns [0, shared)."""

    def __init__(self, logits: torch.Tensor, positions: torch.Tensor, shared: int) -> None:
        self.flat = logits.reshape(-1, logits.shape[-1])[:, :shared]
        self.positions = positions
        self.shared = shared

    def fill(self, index: Index, out: torch.Tensor) -> None:
        rows = self.positions[index]
        if out.dtype == self.flat.dtype:
            torch.index_select(self.flat, 0, rows, out=out)
        else:
            out.copy_(self.flat.index_select(0, rows))


# torch.mm(..., out_dtype=torch.float32): fp32 logits straight from bf16/fp16 operands (CUDA, torch >= 2.8).
_MM_WITH_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


class HiddenRows:
    """Logits computed as head(hidden[index] @ weight[:shared].T) (hidden already restricted to valid tokens).

    With bf16/fp16 operands on CUDA the logits come out of the matmul in fp32 (its accumulator's
    precision): rounding 152k logits of magnitude ~10-30 to bf16 (steps of 0.06-0.125) would
    reorder near-equal candidates, which the ListMLE terms read (benchmarks/GPU_CHECK.md).
    Elsewhere (CPU) the matmul runs in the operands' dtype and the result is upcast.
    """

    def __init__(
        self, hidden_rows: torch.Tensor, weight: torch.Tensor, shared: int, head: OutputHead = IDENTITY_HEAD
    ) -> None:
        self.hidden = hidden_rows
        self.weight = weight[:shared]
        self.shared = shared
        self.head = head

    def fill(self, index: Index, out: torch.Tensor) -> None:
        rows = self.hidden[index]
        if out.dtype == self.weight.dtype == rows.dtype:
            torch.mm(rows, self.weight.t(), out=out)
        elif rows.is_cuda and _MM_WITH_OUT_DTYPE and out.dtype == torch.float32 and rows.dtype == self.weight.dtype:
            out.copy_(torch.mm(rows, self.weight.t(), out_dtype=torch.float32))
        else:  # bf16/fp16 matmul like the model's own lm_head, then upcast
            out.copy_(rows @ self.weight.t())
        self.head.apply_(out)


class StudentLogits(LogitsRows):
    """Student rows from a logits tensor; gradients are kept per valid token in the compute dtype."""

    def __init__(
        self,
        logits: torch.Tensor,
        positions: torch.Tensor,
        shared: int,
        compute_dtype: torch.dtype,
        *,
        need_grad: bool = True,
    ) -> None:
        super().__init__(logits, positions, shared)
        self.grad = (
            torch.zeros(positions.numel(), shared, dtype=compute_dtype, device=logits.device) if need_grad else None
        )

    @property
    def wants_grad(self) -> bool:
        return self.grad is not None

    def add_grad(self, index: Index, grad_rows: torch.Tensor, chunk: ChunkRows) -> None:
        """Store the chunk's logit gradient (`chunk` is unused: these rows are the logits)."""
        if isinstance(index, slice):
            self.grad[index].add_(grad_rows)
        else:
            self.grad.index_add_(0, index, grad_rows)

    def add_sparse_grad(self, index: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> None:
        """grad[index[i], columns[i, j]] += values[i, j]."""
        rows = index.unsqueeze(1).expand_as(columns)
        self.grad.index_put_((rows, columns), values.to(self.grad.dtype), accumulate=True)


class StudentHidden(HiddenRows):
    """Student rows from hidden states and lm_head weight; gradients for both, accumulated per chunk.

    With an output head (scale, softcap) the gradients go through it: the main-pass rows'
    logits are rebuilt from their log-probs (logits = tau * (logprobs + lse)) in a scratch
    buffer, so no [tokens x V] and no extra [chunk x V] buffer is kept for the head.
    """

    def __init__(
        self,
        hidden_rows: torch.Tensor,
        weight: torch.Tensor,
        shared: int,
        compute_dtype: torch.dtype,
        *,
        need_hidden_grad: bool = True,
        need_weight_grad: bool = True,
        head: OutputHead = IDENTITY_HEAD,
    ) -> None:
        super().__init__(hidden_rows, weight, shared, head)
        device = hidden_rows.device
        self.grad_hidden = (
            torch.zeros(hidden_rows.shape, dtype=compute_dtype, device=device) if need_hidden_grad else None
        )
        # Full row count: rows >= shared (padding rows) get zero gradient.
        self.grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=device) if need_weight_grad else None

    @property
    def wants_grad(self) -> bool:
        return self.grad_hidden is not None or self.grad_weight is not None

    def add_grad(self, index: Index, grad_rows: torch.Tensor, chunk: ChunkRows) -> None:
        if not self.head.is_identity:
            logits = chunk.scratch
            if self.head.softcap is not None:
                torch.add(chunk.logprobs, chunk.lse, out=logits).mul_(chunk.tau)
            grad_rows = self.head.raw_grad_from_logits_(grad_rows, logits)
        grad_mm = grad_rows if grad_rows.dtype == self.weight.dtype else grad_rows.to(self.weight.dtype)
        if self.grad_hidden is not None:
            part = grad_mm @ self.weight
            if isinstance(index, slice):
                self.grad_hidden[index].add_(part)
            else:
                self.grad_hidden.index_add_(0, index, part.to(self.grad_hidden.dtype))
        if self.grad_weight is not None:
            rows = self.hidden[index]
            target = self.grad_weight[: self.shared]
            if grad_mm.dtype == target.dtype == rows.dtype:
                target.addmm_(grad_mm.t(), rows)
            else:
                target.add_(grad_mm.t() @ rows.to(grad_mm.dtype))

    def add_sparse_grad(self, index: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> None:
        """The gradient with values[i, j] at logit (index[i], columns[i, j]): a few rows of W each."""
        dtype = self.grad_weight.dtype if self.grad_weight is not None else self.grad_hidden.dtype
        values = values.to(dtype)
        rows = self.hidden[index].to(dtype)  # [n, H]
        picked = self.weight[columns].to(dtype) if self.grad_hidden is not None or not self.head.is_identity else None
        if not self.head.is_identity:  # through the head, at these entries' raw hidden @ W.T
            values = self.head.raw_grad_from_raw(values, torch.einsum("nh,nkh->nk", rows, picked))
        if self.grad_hidden is not None:  # [n, k, H] rows of W
            self.grad_hidden.index_add_(0, index, torch.einsum("nk,nkh->nh", values, picked))
        if self.grad_weight is not None:
            contrib = values.unsqueeze(2) * rows.unsqueeze(1)  # [n, k, H]
            self.grad_weight.index_add_(0, columns.reshape(-1), contrib.reshape(-1, rows.shape[1]))
