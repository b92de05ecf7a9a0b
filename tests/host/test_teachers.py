"""The teacher interface (host/teachers/) without Ray: the experience maker works with any
`DriverTeacher`, the training step's actor-side halves give the objective its TeacherSignals, and the
factories are the only places that choose by placement. The Ray group's retries and stops are
tests/reliability/test_teacher_retries.py; the teachers end to end, tests/host/test_tsdkd_e2e.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
import torch

from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
from tsdkd_plugin.host.teachers import (
    DriverTeacher,
    MicroBatch,
    ShippedSignals,
    StepSamples,
    actor_teacher,
    driver_teacher,
)
from tsdkd_plugin.host.teachers.base import IN_PROCESS_TEACHER_SIGNALS, STUDENT_CANDIDATES, timed
from tsdkd_plugin.host.teachers.colocated import ColocatedTeacher
from tsdkd_plugin.host.teachers.ray_group import RayGroupTeacher
from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, teacher_signals_from_logits

VOCAB = 11


def run_config(placement="separate") -> RunConfig:
    return RunConfig(objective=TSDKDConfig(num_candidates=3, sparse_top_k=4, temperature=2.0),
                     teacher=TeacherConfig("teacher", placement=placement))


class ScriptedTeacher(DriverTeacher):
    """A teacher the trainer has never heard of (as a served one would be): sequence scores from the
    response lengths, one timed phase."""

    def __init__(self):
        self.asked = []

    def signals(self, samples, times):
        self.asked.append(samples)
        with timed(times, "teacher_scoring"):
            return [{"sequence_scores": -mask.sum(dim=1).float()} for mask in samples.action_mask]


def rollout_sample(prompt_len: int, response_len: int):
    from openrlhf.trainer.ppo_utils.experience import Experience

    total = prompt_len + response_len
    sequences = torch.arange(1, total + 1).unsqueeze(0)
    action_mask = torch.zeros(1, total - 1, dtype=torch.bool)
    action_mask[0, prompt_len - 1:] = True
    return Experience(sequences=sequences, attention_mask=torch.ones_like(sequences), action_mask=action_mask,
                      response_length=torch.tensor([float(response_len)]), total_length=torch.tensor([float(total)]),
                      prompts=["p"], labels=["l"])  # fmt: skip


def test_the_experience_maker_works_with_any_driver_teacher():
    from tsdkd_plugin.host.trainer import TeacherRankedExperienceMaker

    args = SimpleNamespace(algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce")),
                           train=SimpleNamespace(dynamic_batch_enable=False),
                           rollout=SimpleNamespace(micro_batch_size=2, n_samples_per_prompt=2))  # fmt: skip
    teacher = ScriptedTeacher()
    maker = TeacherRankedExperienceMaker(None, teacher, None, SimpleNamespace(args=args), SimpleNamespace(pad_token_id=0))
    experiences = maker.make_experience_batch([rollout_sample(3, n) for n in (2, 4, 3, 1)])

    (samples,) = teacher.asked
    assert isinstance(samples, StepSamples) and len(samples) == 2  # one entry per rollout micro-batch
    assert [e.tsdkd["group_ids"].tolist() for e in experiences] == [[0, 0], [1, 1]]  # prompt-major, n = 2
    assert [e.info["teacher_score"].tolist() for e in experiences] == [[-2.0, -4.0], [-3.0, -1.0]]
    assert [e.info["reward"].tolist() for e in experiences] == [[-2.0, -4.0], [-3.0, -1.0]]  # no verifier
    assert set(maker.last_timing) == {"tsdkd/time_teacher_scoring", "tsdkd/transport_bytes_per_token"}
    assert maker.last_timing["tsdkd/transport_bytes_per_token"] == 4 * 4 / 10  # 4 float32 scores, 10 tokens


def sparse_wire(config: TSDKDConfig, batch=2, length=3, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    signals = teacher_signals_from_logits(
        torch.randn(batch, length, VOCAB, generator=generator), config, mask=torch.ones(batch, length),
        shared_vocab_size=VOCAB,
        candidate_ids=torch.rand(batch, length, VOCAB, generator=generator).topk(config.num_candidates).indices,
        sampled_ids=torch.zeros(batch, length, dtype=torch.long),
    )  # fmt: skip
    return signals.to_wire()


def test_shipped_signals_are_the_wire_format_read_back():
    run = run_config()
    wire = sparse_wire(run.objective)
    teacher = actor_teacher(run, strategy=None, shared_vocab_size=VOCAB)
    assert isinstance(teacher, ShippedSignals)
    shipped = {**wire, "group_ids": torch.tensor([0, 0])}
    batch = MicroBatch(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6), 3, shipped=shipped)
    with teacher.signals(batch) as signals:
        expected = TeacherSignals.from_wire(wire, temperature=run.objective.temperature)
        assert signals.kind == "sparse" and signals.temperature == 2.0
        for name, tensor in expected.tensors().items():
            assert torch.equal(getattr(signals, name), tensor), name
    with pytest.raises(RuntimeError, match="come from the driver"):
        teacher.in_process_signals(batch.sequences, torch.ones(2, 3), batch.attention_mask)


def test_the_factories_choose_by_placement():
    separate = driver_teacher(run_config("separate"), policy_group="policy", teacher_group="group",
                              duplicate_factor=1, ckpt_path="ckpt")  # fmt: skip
    colocated = driver_teacher(run_config("colocate"), policy_group="policy", teacher_group=None,
                               duplicate_factor=1, ckpt_path="ckpt")  # fmt: skip
    assert isinstance(separate, RayGroupTeacher) and separate.teacher_group == "group"
    assert isinstance(colocated, ColocatedTeacher)


def test_the_colocated_teacher_asks_the_policy_group_once(monkeypatch):
    scores = [[{"sequence_scores": torch.tensor([-1.0])}], [{"sequence_scores": torch.tensor([-2.0])}]]
    called = []
    policy = SimpleNamespace(async_run_method_batch=lambda method_name, **batch: called.append(method_name) or ["ref"])
    # Two actors per tensor-parallel group answer each chunk (upstream's async_run_method_batch order).
    monkeypatch.setattr(ray, "get", lambda refs: [scores[0], scores[0], scores[1], scores[1]])
    teacher = ColocatedTeacher(policy, duplicate_factor=2)
    samples = StepSamples([torch.ones(1, 4)] * 2, [torch.ones(1, 2)] * 2, [torch.ones(1, 4)] * 2)
    times = {}
    assert teacher.signals(samples, times) == [scores[0][0], scores[1][0]]
    assert called == [IN_PROCESS_TEACHER_SIGNALS] and set(times) == {"tsdkd/time_teacher_scoring"}


def test_the_policy_actor_answers_what_the_driver_side_teachers_call():
    from tsdkd_plugin.host.actor import TSDKDPolicyActorImpl

    for method in (STUDENT_CANDIDATES, IN_PROCESS_TEACHER_SIGNALS):
        assert callable(getattr(TSDKDPolicyActorImpl, method, None)), method
