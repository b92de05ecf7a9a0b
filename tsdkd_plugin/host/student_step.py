"""The student's side of the TSD-KD training step: its outputs, and the objective on them.

Two ways to hand the student to the objective (`--tsdkd.student_logits`):

- ``fused`` (default): the final hidden states and the output embedding. `tsdkd_loss_fused`
  makes the logits `chunk_size` tokens at a time, with their exact gradient, so no
  [tokens x vocabulary] student tensor exists. (4 responses of 1k tokens at V = 151,936 are
  2.5 GB of fp32 logits, and as much again for their gradient, per micro-batch otherwise.)
- ``full``: upstream `Actor`'s logits [B, T, V] and `tsdkd_loss`; the earlier path, kept to
  compare against.

In fused mode the hidden states still come from upstream `Actor.forward`: during that call a
forward pre-hook on the model's output layer keeps the layer's input (what `lm_head` would
multiply: the final-norm hidden states of every position) and hands the layer an empty slice
of it instead, so the [B, T, V] logits are never computed. What a model family does *before*
its output layer is therefore included by construction; what it does *after* (Gemma-2's logit
softcapping, a logit scale) is described by an `OutputHead` and applied by the objective.

Also here: the batch helpers both sides use (`action_positions`, `in_vocab_action_mask`) and the
student's top-k candidates for the sparse transport, made the same way as the loss makes its
logits. Torch and the objective only: benchmarks/gpu_actor_step.py runs this on a bare CUDA image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tsdkd_plugin.host.model_io import output_head_for_config
from tsdkd_plugin.objective import IDENTITY_HEAD, OutputHead, TeacherSignals, TSDKDConfig, tsdkd_loss, tsdkd_loss_fused
from tsdkd_plugin.objective.chunking import HiddenRows

STUDENT_LOGITS_MODES = ("fused", "full")
DEFAULT_STUDENT_LOGITS = "fused"


# ----------------------------------------------------------------------------- batch alignment


def action_positions(per_position: torch.Tensor, num_actions: int) -> torch.Tensor:
    """[B, T, ...] -> [B, num_actions, ...]: the positions that predict the response tokens.

    OpenRLHF sequences are [prompt (left-padded) | response (right-padded)] and the response
    occupies the last `num_actions` positions, so the logits (or the hidden states that make
    them) predicting action t sit at the `num_actions` positions before the last one.
    """
    return per_position[:, :-1][:, -num_actions:]


def in_vocab_action_mask(sequences: torch.Tensor, action_mask: torch.Tensor, shared_vocab_size: int) -> torch.Tensor:
    """Response positions whose sampled id is a real token.

    A model's logit rows past len(tokenizer) are padding; a well-trained model never
    samples them, but a barely trained one can. Such positions are left out of every
    term (and counted), instead of failing the run.
    """
    sampled = sequences[:, -action_mask.shape[1] :]
    return action_mask.bool() & (sampled < shared_vocab_size)


# ----------------------------------------------------------------------------- the output layer


def student_output_head(model_config) -> OutputHead:
    """What the student's family does to `hidden @ W.T` after its output layer: the one mapping of
    host/model_io.py (Gemma-2's softcapping, Cohere's and Granite's scaling; identity for
    Qwen2/2.5/3 and Llama). A family it does not know is refused (UnsupportedModelFamily)."""
    return output_head_for_config(model_config)


def fused_output_layer_problem(output_layer) -> str | None:
    """Why `hidden @ output_layer.weight.T` is not what this output layer computes (None if it is).

    Only a plain `torch.nn.Linear` without bias qualifies: a LoRA adapter on lm_head, a
    quantized or tensor-parallel output layer (DeepSpeed AutoTP's `LmHeadLinearAllreduce`) or a
    bias (Phi) would all be computed wrong by the fused path.
    """
    if output_layer is None:
        return "model has no output embedding (get_output_embeddings() is None)"
    if type(output_layer) is not torch.nn.Linear:
        return (
            f"output layer is a {type(output_layer).__module__}.{type(output_layer).__name__}, not a plain "
            "torch.nn.Linear (a LoRA adapter or modules_to_save on lm_head, a quantized or tensor-parallel layer)"
        )
    if output_layer.bias is not None:
        return "output layer has a bias"
    if not output_layer.weight.is_floating_point():
        return f"output layer weight is {output_layer.weight.dtype}, not floating point"
    return None


@dataclass
class _Captured:
    hidden: torch.Tensor | None = None
    calls: int = 0


@contextlib.contextmanager
def output_layer_skipped(output_layer: torch.nn.Module) -> Iterator[_Captured]:
    """While active, `output_layer` receives an empty slice of its input (so it computes
    [..., 0, V] logits) and the input itself is kept in the yielded object's `hidden`."""
    captured = _Captured()

    def keep_input_pass_empty(module, args, kwargs):
        hidden = args[0] if args else kwargs["input"]
        captured.hidden, captured.calls = hidden, captured.calls + 1
        empty = hidden[..., :0, :]  # no positions: [B, 0, H] (or [0, H] for a flattened input)
        if args:
            return (empty, *args[1:]), kwargs
        return args, {**kwargs, "input": empty}

    # prepend: run before hooks registered earlier, e.g. ZeRO-3's, which wraps the layer's input in a
    # function that expects the layer's own backward to run first; the captured tensor must be the
    # decoder's output itself, and the layer's hooks only ever see the empty slice.
    handle = output_layer.register_forward_pre_hook(keep_input_pass_empty, with_kwargs=True, prepend=True)
    try:
        yield captured
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the student's outputs


@dataclass
class StudentOutputs:
    """What the objective needs from one student forward, aligned with the action mask:
    raw logits [B, A, V] (full mode) or final hidden states [B, A, H] plus the family's
    OutputHead (fused mode; the output embedding is passed to `student_objective` separately,
    because under ZeRO-3 it exists only while gathered)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: OutputHead = IDENTITY_HEAD

    @property
    def graph_tensor(self) -> torch.Tensor:
        """The tensor that ties these outputs to the student's graph (for a zero-gradient surrogate)."""
        return self.logits if self.logits is not None else self.hidden


class StudentForward:
    """Runs the student for the objective in the mode `--tsdkd.student_logits` selects.

    `hf_model`: the Hugging Face causal LM inside the actor (PEFT-wrapped or not); its output
    embedding module and config decide whether the fused mode can reproduce its logits, and is
    refused with a sentence naming the model type when it cannot.
    """

    def __init__(self, hf_model: torch.nn.Module, mode: str = DEFAULT_STUDENT_LOGITS) -> None:
        if mode not in STUDENT_LOGITS_MODES:
            raise ValueError(f"--tsdkd.student_logits must be one of {', '.join(STUDENT_LOGITS_MODES)}, got {mode!r}")
        self.mode = mode
        self.output_layer = None
        self.head = IDENTITY_HEAD
        if mode == "fused":
            config = getattr(hf_model, "config", None)
            model_type = getattr(config, "model_type", type(hf_model).__name__)
            output_layer = hf_model.get_output_embeddings()
            problem = fused_output_layer_problem(output_layer)
            if problem:
                raise ValueError(
                    f"--tsdkd.student_logits fused computes the student's logits as hidden @ lm_head.weight.T, but "
                    f"this {model_type} student's {problem}; use --tsdkd.student_logits full"
                )
            self.output_layer = output_layer
            self.head = student_output_head(config)

    @property
    def fused(self) -> bool:
        return self.mode == "fused"

    def __call__(
        self, actor: Callable, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int, **actor_kwargs
    ) -> StudentOutputs:
        """`actor(sequences, attention_mask=..., return_output=True, **actor_kwargs)` is upstream
        `Actor.forward` (or anything with its call signature and logits output)."""
        if not self.fused:
            output = actor(sequences, attention_mask=attention_mask, return_output=True, **actor_kwargs)
            logits = action_positions(output["logits"], num_actions)
            temperature = getattr(actor, "temperature", 1.0)
            if temperature != 1.0:
                # Actor divides by the rollout temperature; the objective applies its own tau to raw logits.
                logits = logits * temperature
            return StudentOutputs(logits=logits)
        with output_layer_skipped(self.output_layer) as captured:
            actor(sequences, attention_mask=attention_mask, return_output=True, **actor_kwargs)
        if captured.calls != 1:
            raise RuntimeError(
                f"--tsdkd.student_logits fused: the student's output layer ran {captured.calls} times in one forward "
                "(expected once, on the final hidden states); use --tsdkd.student_logits full"
            )
        return StudentOutputs(hidden=action_positions(captured.hidden, num_actions), head=self.head)


def objective_at_step(config: TSDKDConfig, optimizer_step: int) -> tuple[TSDKDConfig, dict[str, float]]:
    """The objective for a micro-batch of optimizer step `optimizer_step` (0 for the first): the run's
    config with its extra terms' weights warmed up (`TSDKDConfig.at_step`, --tsdkd.weight_warmup_steps),
    and what to log about it: {"weight_warmup_factor": min(1, step / N)} when the warm-up is on, else
    nothing (so the logged keys are the same at every step of a run)."""
    step_config = config.at_step(optimizer_step)
    if config.weight_warmup_steps == 0:
        return step_config, {}
    return step_config, {"weight_warmup_factor": config.warmup_factor(optimizer_step)}


def student_objective(
    student: StudentOutputs,
    output_weight: torch.Tensor | None,
    teacher: TeacherSignals,
    mask: torch.Tensor,
    config: TSDKDConfig,
    *,
    shared_vocab_size: int,
    sampled_ids: torch.Tensor | None,
    group_size: int | None,
):
    """(loss, metrics) of the TSD-KD objective on the student's outputs (see docs/objective.md)."""
    common = dict(shared_vocab_size=shared_vocab_size, sampled_ids=sampled_ids, group_size=group_size)
    if student.logits is not None:
        return tsdkd_loss(student.logits, teacher, mask, config, **common)
    if not student.head.is_identity:
        common["student_head"] = student.head
    return tsdkd_loss_fused(student.hidden, output_weight, teacher, mask, config, **common)


@torch.no_grad()
def student_top_k(
    student: StudentOutputs, output_weight: torch.Tensor | None, shared_vocab_size: int, k: int, chunk_size: int
) -> torch.Tensor:
    """[B, A, k] int64: the student's k highest-scoring shared token ids at every position.

    Fused mode makes the logits chunk by chunk exactly as the loss does (objective.chunking's
    HiddenRows, output head included), so the candidates are the ones the fused loss sees."""
    if student.logits is not None:
        return student.logits[..., :shared_vocab_size].topk(k, dim=-1).indices
    batch, positions, hidden_size = student.hidden.shape
    rows = student.hidden.reshape(-1, hidden_size)
    source = HiddenRows(rows, output_weight, shared_vocab_size, student.head)
    compute_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    buffer = torch.empty(min(chunk_size, rows.shape[0]), shared_vocab_size, dtype=compute_dtype, device=rows.device)
    ids = torch.empty(rows.shape[0], k, dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        stop = min(start + chunk_size, rows.shape[0])
        logits = buffer[: stop - start]
        source.fill(slice(start, stop), logits)
        ids[start:stop] = logits.topk(k, dim=-1).indices
    return ids.view(batch, positions, k)
