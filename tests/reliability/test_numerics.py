"""Numerical safety and data-error policy of the TSD-KD training step (issue: reliability, items 2 and 5).

The policy actor's real `training_step` is driven without Ray or DeepSpeed: a tiny
student module and a stand-in strategy (plain backward and optimizer step). Checked:
empty and truncated responses train without NaN and are counted; a micro-batch with
NaN teacher signals is skipped (zero gradient, counted); N in a row stop the run with
one sentence. The objective's own bf16 / extreme-logit / all-masked tests are in
tests/objective/test_fused.py; the single-token and mixed cases here use the sparse
transport the host sends.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tsdkd_plugin.host.numerics import (
    NonFiniteGuard,
    NonFiniteLossStop,
    is_nonfinite_error,
    response_health,
    zero_surrogate,
)
from tsdkd_plugin.objective import TSDKDConfig, teacher_signals_from_logits, tsdkd_loss

VOCAB, EOS = 23, 22
CONFIG = TSDKDConfig(num_candidates=3, indirect_level="both", sparse_top_k=6)


def distinct_candidates(batch, length, generator):
    """The student's top-k ids per position (distinct, as the objective requires)."""
    return torch.rand(batch, length, VOCAB, generator=generator).topk(CONFIG.num_candidates, dim=-1).indices


# ----------------------------------------------------------------------------- pure pieces


def test_guard_skips_counts_and_stops_after_n_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3, resume_hint=lambda: "rerun with --ckpt.load_enable")
    assert guard.record(True) and guard.record(True)
    assert not guard.record(False)  # a finite micro-batch resets the streak
    assert guard.record(True) and guard.record(True)
    with pytest.raises(NonFiniteLossStop) as stop:
        guard.record(True, "teacher entropy contains NaN or inf")
    message = str(stop.value)
    assert "3 consecutive micro-batches" in message and "teacher entropy contains NaN or inf" in message
    assert "--tsdkd.max_nonfinite_steps 3" in message and "rerun with --ckpt.load_enable" in message
    assert guard.skipped_total == 5 and "\n" not in message
    with pytest.raises(ValueError):
        NonFiniteGuard(max_consecutive=0)


def test_only_the_objectives_nonfinite_refusals_are_skipped():
    assert is_nonfinite_error(ValueError("teacher logits contain NaN or inf; teacher inputs must be finite"))
    assert is_nonfinite_error(ValueError("TSD-KD loss is not finite although inputs passed validation"))
    assert not is_nonfinite_error(ValueError("mask must have shape [2, 5], got [2, 4]"))  # a bug: must surface
    assert not is_nonfinite_error(RuntimeError("NaN or inf"))


def test_zero_surrogate_has_zero_gradient_even_for_nonfinite_logits():
    logits = torch.tensor([[1.0, float("inf")], [float("nan"), -2.0]], requires_grad=True)
    surrogate = zero_surrogate(logits)
    surrogate.backward()
    assert surrogate.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_response_health_counts_empty_and_no_eos():
    # B=4, A=3; response positions are the last 3 tokens of each row.
    sequences = torch.tensor([[5, 6, 7, EOS], [5, 6, 7, 8], [5, 0, 0, 0], [5, 9, VOCAB + 2, 0]])
    action_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
    loss_mask = action_mask.bool() & (sequences[:, -3:] < VOCAB)
    loss_mask[3] = False  # e.g. every sampled id was a padding row
    health = response_health(sequences, action_mask, loss_mask, EOS)
    assert health["empty_response"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert health["no_eos"].tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_token_empty_and_extreme_rows_stay_finite(dtype):
    """Sparse transport: single-token responses, a fully masked row and +-1e4 logits, in fp32 and bf16."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 5)
    mask[0, 0] = 1  # single-token response
    mask[1, :5] = 1  # truncated: runs to the end
    mask[3, 0] = 1  # single token, extreme logits
    student = torch.randn(4, 5, VOCAB, generator=generator)
    student[3] = torch.where(torch.rand(5, VOCAB, generator=generator) > 0.5, 1e4, -1e4)
    teacher_logits = torch.randn(4, 5, VOCAB, generator=generator) * 1e3
    sampled = torch.randint(0, VOCAB, (4, 5), generator=generator)
    teacher = teacher_signals_from_logits(
        teacher_logits, CONFIG, mask=mask, shared_vocab_size=VOCAB,
        candidate_ids=distinct_candidates(4, 5, generator), sampled_ids=sampled,
    )  # fmt: skip
    logits = student.to(dtype).requires_grad_(True)
    loss, metrics = tsdkd_loss(
        logits, teacher, mask, CONFIG, shared_vocab_size=VOCAB, sampled_ids=sampled, group_size=2
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad.float()).all()
    assert all(math.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- the real training step


class TinyStudent(torch.nn.Module):
    """Stands in for OpenRLHF's Actor: same call signature, logits for every position, and an
    output layer the fused training step (the default) can find."""

    temperature = 1.0
    config = SimpleNamespace(model_type="llama")  # a family whose logits are plain hidden @ W.T

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB + 3, 16)  # 3 padding rows past the tokenizer, as real models have
        self.head = torch.nn.Linear(16, VOCAB + 3, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, sequences, attention_mask=None, return_output=False, ring_attn_group=None):
        return {"logits": self.head(torch.tanh(self.embed(sequences)))}


class PlainStrategy:
    """The few DeepspeedStrategy calls the training step makes, on one process."""

    ring_attn_group = None

    def __init__(self, args):
        self.args = args
        self.backward_calls = 0

    def backward(self, loss, model, optimizer):
        self.backward_calls += 1
        loss.backward()

    optimizer_steps = 0

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        optimizer.step()
        optimizer.zero_grad()
        self.optimizer_steps += 1

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, value, op="mean"):
        return value


def make_trainer(tmp_path, max_nonfinite_steps=3):
    from tsdkd_plugin.host.actor import TSDKDActorTrainer
    from tsdkd_plugin.host.checkpoint import resume_hint
    from tsdkd_plugin.host.numerics import NonFiniteGuard
    from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
    from tsdkd_plugin.host.student_step import StudentForward
    from tsdkd_plugin.host.teachers import ShippedSignals

    args = SimpleNamespace(ds=SimpleNamespace(zero_stage=0), ckpt=SimpleNamespace(path=str(tmp_path / "ckpt")))
    run = RunConfig(
        objective=CONFIG,
        teacher=TeacherConfig("teacher"),
        ranking_group_size=2,
        max_nonfinite_steps=max_nonfinite_steps,
    )
    trainer = TSDKDActorTrainer.__new__(TSDKDActorTrainer)  # no Ray/DeepSpeed: set what training_step reads
    trainer.args, trainer.strategy = args, PlainStrategy(args)
    trainer.actor = TinyStudent()
    trainer.student = StudentForward(
        trainer.actor, run.student_logits
    )  # the default, fused: hidden states + output layer
    trainer.actor_optim = torch.optim.SGD(trainer.actor.parameters(), lr=0.5)
    trainer.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [0.5])
    trainer.ema_model = None
    trainer.tokenizer = SimpleNamespace(eos_token_id=EOS)
    trainer.run, trainer.shared_vocab_size = run, VOCAB
    trainer.teacher = ShippedSignals(temperature=CONFIG.temperature)  # a separate teacher's signals came with the batch
    trainer.nonfinite_guard = NonFiniteGuard(run.max_nonfinite_steps, lambda: resume_hint(args.ckpt.path))
    # The real one reads the DeepSpeed engine's step counter (`actor.model`), which TinyStudent lacks.
    trainer.optimizer_steps_taken = lambda: trainer.strategy.optimizer_steps
    return trainer


def make_experience(empty_row=True):
    """4 samples (2 prompts x 2), prompt 3 tokens, response slot 4: a normal response ending
    in EOS, a truncated one (no EOS), an empty one, and a single-token one."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, VOCAB - 1, (4, 7), generator=generator)
    action_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    if not empty_row:
        action_mask[2, 0] = True
    sequences[0, -1] = EOS
    sequences[2, -4:] = 0
    teacher_logits = torch.randn(4, 4, VOCAB, generator=generator)
    signals = teacher_signals_from_logits(
        teacher_logits, CONFIG, mask=action_mask.float(), shared_vocab_size=VOCAB,
        candidate_ids=distinct_candidates(4, 4, generator),
        sampled_ids=sequences[:, -4:].masked_fill(~action_mask, 0),
    ).tensors()  # fmt: skip
    signals["group_ids"] = torch.tensor([0, 0, 1, 1])
    experience = Experience(sequences=sequences, attention_mask=torch.ones_like(sequences), action_mask=action_mask)
    experience.tsdkd = signals
    return experience


def parameters(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_empty_and_truncated_responses_train_and_are_counted(tmp_path):
    trainer = make_trainer(tmp_path)
    before = parameters(trainer.actor)
    status = trainer.training_step(make_experience(), kl_ctl=0.0, step=0)
    metrics = status["metrics"]
    after = parameters(trainer.actor)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert math.isfinite(float(metrics["policy_loss"])) and float(metrics["policy_loss"]) > 0
    assert metrics["tsdkd/empty_response_fraction"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert metrics["tsdkd/no_eos_fraction"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert metrics["tsdkd/nonfinite_skipped"] == 0.0
    assert status["weights"]["tsdkd/no_eos_fraction"] == "sample"


def test_nonfinite_teacher_signals_skip_the_micro_batch(tmp_path):
    trainer = make_trainer(tmp_path)
    experience = make_experience()
    experience.tsdkd["entropy"][0, 1] = float("nan")
    before = parameters(trainer.actor)
    status = trainer.training_step(experience, kl_ctl=0.0, step=0)
    assert torch.equal(parameters(trainer.actor), before)  # zero gradient: SGD leaves the weights alone
    assert trainer.strategy.backward_calls == 1  # still one backward (accumulation boundaries stay aligned)
    assert status["metrics"]["tsdkd/nonfinite_skipped"] == 1.0 and float(status["metrics"]["policy_loss"]) == 0.0
    assert all(math.isfinite(float(v)) for k, v in status["metrics"].items() if k.startswith("tsdkd/loss"))


def test_repeated_nonfinite_micro_batches_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_nonfinite_steps=2)
    (tmp_path / "ckpt" / "_actor" / "global_step4").mkdir(parents=True)
    (tmp_path / "ckpt" / "_actor" / "latest").write_text("global_step4")
    poisoned = make_experience()
    poisoned.tsdkd["topk_logprobs"][1, 0, 0] = float("inf")
    trainer.training_step(poisoned, kl_ctl=0.0, step=0)
    trainer.training_step(make_experience(empty_row=False), kl_ctl=0.0, step=1)  # resets the streak
    trainer.training_step(poisoned, kl_ctl=0.0, step=2)
    before = parameters(trainer.actor)
    with pytest.raises(NonFiniteLossStop) as stop:
        trainer.training_step(poisoned, kl_ctl=0.0, step=3)
    assert torch.equal(parameters(trainer.actor), before) and torch.isfinite(before).all()
    message = str(stop.value)
    assert "2 consecutive micro-batches had a non-finite loss" in message
    assert "resume from global_step4" in message and "--ckpt.load_enable" in message


def test_injected_nonfinite_teacher_is_skipped(tmp_path, monkeypatch):
    """The fault hook the end-to-end test uses (TSDKD_FAULT_INJECT) goes through the same skip."""
    import tsdkd_plugin.host.faults as faults

    monkeypatch.setenv(faults.FAULT_INJECT_ENV, "nonfinite_teacher_at_call=2")
    monkeypatch.setattr(faults, "_calls", faults.collections.Counter())
    trainer = make_trainer(tmp_path)
    skipped = [trainer.training_step(make_experience(), 0.0, i)["metrics"]["tsdkd/nonfinite_skipped"] for i in range(3)]
    assert skipped == [0.0, 1.0, 0.0]


def test_an_injected_broken_teacher_is_nan_in_either_transport():
    """The fault hook's poison (host/numerics.py poison_teacher) reaches the teacher's outputs of both
    transports: the colocated teacher's hidden states (never its weight) and every shipped float."""
    from tsdkd_plugin.host.numerics import poison_teacher
    from tsdkd_plugin.objective import TeacherSignals

    weight = torch.randn(VOCAB, 8)
    dense = poison_teacher(TeacherSignals(hidden=torch.randn(2, 3, 8), lm_head_weight=weight))
    assert torch.isnan(dense.hidden).all() and dense.lm_head_weight is weight
    generator = torch.Generator().manual_seed(0)
    sparse = teacher_signals_from_logits(
        torch.randn(2, 3, VOCAB, generator=generator), CONFIG, mask=torch.ones(2, 3), shared_vocab_size=VOCAB,
        candidate_ids=distinct_candidates(2, 3, generator), sampled_ids=torch.zeros(2, 3, dtype=torch.long),
    )  # fmt: skip
    poisoned = poison_teacher(sparse)
    for name, tensor in poisoned.tensors().items():
        if tensor.is_floating_point():
            assert torch.isnan(tensor).all(), name
        else:
            assert torch.equal(tensor, getattr(sparse, name)), name
    assert poisoned.temperature == sparse.temperature
