"""Entropy regularization: keep the student confident where it is most uncertain.

    L_ent = mean of H_S(t) over valid completion tokens with H_S(t) >= Q_{1-f}(H_S)

Q_{1-f} is the (1 - f)-quantile (linear interpolation, like torch.quantile) of the
student entropies of the valid completion tokens only -- padding never counts
(the reference code's quantile included padding). f = entropy_top_fraction;
0.9 is the reference code's behaviour.
"""

from __future__ import annotations

import math

import torch

from .selective_jsd import rowdot_


def entropy_from_logprobs(logq: torch.Tensor, q: torch.Tensor, *, scratch: torch.Tensor) -> torch.Tensor:
    """H = -sum_v q_v log q_v per row (q = exp(logq); 0 * log 0 never occurs with finite logits).

    scratch: a [C, V] buffer that receives q * log q (it may be q itself if q is not needed after)."""
    return -rowdot_(q, logq, out=scratch)


def add_entropy_grad_(
    grad: torch.Tensor,
    logq: torch.Tensor,
    q: torch.Tensor,
    entropy: torch.Tensor,
    coef: torch.Tensor,
    *,
    scratch: torch.Tensor,
) -> None:
    """grad += coef[:, None] * dH/dzs, where dH/dzs_v = -q_v (log q_v + H) for zs = z / tau."""
    torch.add(logq, entropy.unsqueeze(1), out=scratch)
    scratch.mul_(q)
    grad.addcmul_(scratch, (-coef).unsqueeze(1))


def _quantile_position(num: int, top_fraction: float) -> float:
    # One definition shared by the threshold and the expected count below.
    return (1.0 - top_fraction) * (num - 1)


def entropy_selection(entropy: torch.Tensor, top_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose entropy is at or above the (1 - top_fraction)-quantile.

    entropy: [N] student entropies of the valid tokens. Returns (selected [N] bool,
    threshold 0-dim). Same linear interpolation as torch.quantile, written with a
    sort so it has no input-size limit.
    """
    if entropy.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool), entropy.new_zeros(())
    ordered = torch.sort(entropy.detach()).values
    position = _quantile_position(entropy.numel(), top_fraction)
    lower = math.floor(position)
    upper = min(lower + 1, entropy.numel() - 1)
    threshold = torch.lerp(ordered[lower], ordered[upper], position - lower)
    return entropy >= threshold, threshold


def expected_selected_count(num: int, top_fraction: float) -> int:
    """How many of `num` distinct entropies entropy_selection keeps.

    The fused path uses this before any entropy is known (it weights every token
    by 1/count and corrects the few it should not have); ties or rounding at the
    threshold only make that correction pass longer, never wrong.
    """
    if num == 0:
        return 0
    position = _quantile_position(num, top_fraction)
    lower = math.floor(position)
    return num - lower if position == lower else num - lower - 1
