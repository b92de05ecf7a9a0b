"""TSD-KD objective: pure PyTorch (no Ray, DeepSpeed, vLLM or OpenRLHF imports).

    from tsdkd_plugin.objective import TSDKDConfig, TeacherSignals, tsdkd_loss, tsdkd_loss_fused

See docs/objective.md for the formulas, defaults, transports and chunking.

Modules, one concern each:
    config.py         TSDKDConfig, every weight and switch, validated at construction; paper/reference PRESETS
    errors.py         NonFiniteInputError (NaN/inf inputs: a ValueError the actor may skip)
    selective_jsd.py  direct term: entropy gate, generalized JSD (dense and K+1-bucket) with gradients
    entropy.py        entropy regularization: entropy, its gradient, quantile selection
    listmle.py        indirect terms: ListMLE (suffix / buggy prefix), per-sequence opener, sequence level
    transport.py      TeacherSignals (dense or sparse), its wire format, the teacher-side sparse-signal builders
    chunking.py       row sources (logits or hidden @ W, chunk by chunk), gradient sinks, output heads
    terms.py          the four loss terms as units: per chunk, after the main pass, corrections, metrics
    engine.py         the chunk loop and the correction pass shared by both entry points
    loss.py           tsdkd_loss / tsdkd_loss_fused: call-time validation + autograd wrappers
"""

from .chunking import IDENTITY_HEAD, OutputHead
from .config import PRESETS, TSDKDConfig
from .engine import BALANCE_KEYS, DIAGNOSTIC_KEYS, METRIC_KEYS, metric_keys
from .entropy import entropy_selection
from .errors import NonFiniteInputError
from .listmle import listmle, listmle_value_and_grad, opener_mask, sequence_listmle
from .loss import tsdkd_loss, tsdkd_loss_fused
from .selective_jsd import entropy_gate, generalized_jsd_dense, generalized_jsd_partition
from .transport import TeacherSignals, check_shared_vocab, teacher_signals_from_hidden, teacher_signals_from_logits

__all__ = [
    "BALANCE_KEYS",
    "DIAGNOSTIC_KEYS",
    "IDENTITY_HEAD",
    "OutputHead",
    "METRIC_KEYS",
    "PRESETS",
    "NonFiniteInputError",
    "TSDKDConfig",
    "TeacherSignals",
    "check_shared_vocab",
    "entropy_gate",
    "entropy_selection",
    "generalized_jsd_dense",
    "metric_keys",
    "generalized_jsd_partition",
    "listmle",
    "listmle_value_and_grad",
    "opener_mask",
    "sequence_listmle",
    "teacher_signals_from_hidden",
    "teacher_signals_from_logits",
    "tsdkd_loss",
    "tsdkd_loss_fused",
]
