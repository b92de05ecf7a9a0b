"""The server teacher over HTTP against an emulated vLLM server on the loopback address
(host/teachers/server/emulation.py): what a healthy server gives, and what happens when the server
dies mid-run, answers garbage, is slow, is overloaded or refuses; then the checks made before any
rollout (served model, context length, tokenizer, log-prob limit). Every test bounds its own time
(small timeouts and backoffs); the real vLLM server is tests/host/test_server_teacher_vllm.py.
"""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.host.faults import TrainingStoppedError, stop_reason
from tsdkd_plugin.host.student_step import action_positions, in_vocab_action_mask
from tsdkd_plugin.host.teachers.server import (
    ServerTeacher,
    ServerTeacherFailedError,
    ServerTeacherSettings,
    ServerTeacherUnavailableError,
    parse_server_urls,
)
from tsdkd_plugin.host.teachers.server.checks import check_server_teacher
from tsdkd_plugin.host.teachers.server.emulation import FakeVLLMServer, Misbehaviour
from tsdkd_plugin.objective import TSDKDConfig, teacher_signals_from_logits

pytestmark = pytest.mark.network  # emulated servers on loopback

ROWS, SHARED, K = 96, 80, 8
FAST = dict(timeout_s=2.0, max_retries=1, backoff_s=0.05, backoff_cap_s=0.1)


def logits_of(tokens):
    table = torch.randn(ROWS, ROWS, generator=torch.Generator().manual_seed(0)) * 3
    rows = table[torch.tensor(tokens)]
    return rows + rows.cumsum(0) / torch.arange(1, len(tokens) + 1).unsqueeze(1) * 0.5


def micro_batches(count=2, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        length = 12
        sequences = torch.randint(0, SHARED, (rows, length), generator=g)
        attention = torch.ones(rows, length, dtype=torch.long)
        action = torch.zeros(rows, length - 1, dtype=torch.bool)
        action[:, 3:] = True
        candidates = torch.stack([torch.randperm(SHARED, generator=g)[:4] for _ in range(action.numel())])
        batches.append(
            dict(
                sequences=sequences,
                attention_mask=attention,
                action_mask=action,
                candidate_ids=candidates.view(rows, length - 1, 4).to(torch.int32),
            )
        )
    return batches


def teacher_for(urls, request_top_k=ROWS, **overrides):
    settings = ServerTeacherSettings(
        urls=tuple(urls), model="teacher", request_top_k=request_top_k, **{**FAST, **overrides}
    )
    return ServerTeacher(settings, TSDKDConfig(sparse_top_k=K, num_candidates=4), SHARED)


def reference_wire(batch):
    sequences, action = batch["sequences"], batch["action_mask"]
    mask = in_vocab_action_mask(sequences, action, SHARED)
    full = torch.stack([logits_of(row.tolist()) for row in sequences])
    return teacher_signals_from_logits(
        action_positions(full, action.shape[1]),
        TSDKDConfig(sparse_top_k=K, num_candidates=4),
        mask=mask,
        shared_vocab_size=SHARED,
        candidate_ids=batch["candidate_ids"],
        sampled_ids=sequences[:, 1:].masked_fill(~mask, 0),
    ).to_wire()


def test_a_healthy_server_gives_the_ray_teachers_signals_with_bounded_concurrency():
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(delay_s=0.05)) as fake:
        teacher = teacher_for([fake.url], concurrency=3)
        batches = micro_batches()
        wires = teacher.score(batches)
    assert fake.completions == 8 and 1 < fake.max_in_flight <= 3
    for wire, batch in zip(wires, batches, strict=True):
        want = reference_wire(batch)
        assert set(wire) == set(want)
        for name in want:
            if want[name].is_floating_point():
                assert (wire[name].float() - want[name].float()).abs().max() < 2e-3, name  # float16 on the wire
            else:
                assert torch.equal(wire[name], want[name]), name
    assert teacher.last_stats.positions == 2 * 4 * 8


def test_a_server_that_dies_mid_run_stops_the_run_with_one_sentence_after_its_retries():
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(die_after=5)) as fake:
        teacher = teacher_for([fake.url], concurrency=1)
        with pytest.raises(ServerTeacherUnavailableError) as caught:
            teacher.score(micro_batches())
    message = str(caught.value)
    assert fake.answered == 5
    assert message.startswith("TSD-KD stopped: the teacher server (--teacher.remote_url http://127.0.0.1:")
    assert "failed to answer a scoring request 2 times (--teacher.max_retries 1, --teacher.timeout_s 2 each)" in message
    assert ("cannot connect" in message or "closed the connection" in message) and "\n" not in message
    assert isinstance(caught.value, TrainingStoppedError) and stop_reason(caught.value) is caught.value


@pytest.mark.parametrize("garbage", ["<html>502 Bad Gateway</html>", '{"choices": []}', '{"choices": [{"text": "x"}]}'])
def test_garbage_stops_the_run_at_once(garbage):
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(garbage=garbage)) as fake:
        teacher = teacher_for([fake.url], concurrency=1)
        with pytest.raises(ServerTeacherFailedError) as caught:
            teacher.score(micro_batches(count=1, rows=1))
    assert fake.completions == 1  # not retried
    message = str(caught.value)
    assert "answered a scoring request with something other than vLLM's prompt log-probs" in message
    assert "it was not retried" in message and "\n" not in message


def test_a_slow_server_times_out_and_a_slow_first_answer_is_retried():
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(delay_s=1.5)) as fake:
        teacher = teacher_for([fake.url], timeout_s=0.5)
        with pytest.raises(ServerTeacherUnavailableError, match=r"no answer within 0\.5 s"):
            teacher.score(micro_batches(count=1, rows=1))
    assert fake.completions == 2 and fake.answered == 0  # both attempts timed out before the answer
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(delay_s=1.5, slow_attempts=1)) as fake:
        wires = teacher_for([fake.url], timeout_s=0.5).score(micro_batches(count=1, rows=1))
    assert fake.completions == 2 and wires[0]["entropy"].shape == (1, 11)


def test_overload_is_retried_and_a_refusal_is_not():
    with FakeVLLMServer(logits_of, max_logprobs=ROWS, misbehaviour=Misbehaviour(status=503, status_attempts=2)) as fake:
        teacher_for([fake.url], concurrency=1, max_retries=2).score(micro_batches(count=1, rows=1))
    assert fake.completions == 3
    with FakeVLLMServer(logits_of, max_logprobs=16) as fake:
        teacher = teacher_for([fake.url], concurrency=1, max_retries=3)
        with pytest.raises(ServerTeacherFailedError) as caught:
            teacher.score(micro_batches(count=1, rows=1))
    assert fake.completions == 1
    assert "refused a scoring request with HTTP 400: Requested prompt logprobs of 96" in str(caught.value)
    assert "restart the server with --max-logprobs 96 or more" in str(caught.value)


def test_a_dead_replica_is_skipped_by_the_retry():
    with FakeVLLMServer(logits_of, max_logprobs=ROWS) as alive, FakeVLLMServer(logits_of, max_logprobs=ROWS) as dead:
        dead.die()
        teacher = teacher_for([dead.url, alive.url], concurrency=2)
        wires = teacher.score(micro_batches(count=1, rows=4))
    assert alive.completions == 4 and len(wires) == 1  # two went to the dead one first, then moved on


def test_urls_parse_and_bad_ones_are_named():
    assert parse_server_urls("http://a:8000/, http://b:8001/v1") == ("http://a:8000", "http://b:8001")
    for bad, words in (
        ("a:8000", r"not an http\(s\) URL"),
        ("http://a:x", "invalid port"),
        ("", "no URL given"),
        ("http://a:1,http://a:1", "same server twice"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_server_urls(bad)


# ----------------------------------------------------------------------------- checks before any rollout


def toy_logits_of(tokens):
    """A 'model' with the toy tokenizer's 400 ids in 512 logit rows."""
    return torch.randn(len(tokens), 512, generator=torch.Generator().manual_seed(len(tokens)))


@pytest.fixture
def toy_server(toy_tokenizer):
    with FakeVLLMServer(toy_logits_of, max_logprobs=64, max_model_len=97, tokenizer=toy_tokenizer) as fake:
        yield fake


def check(fake_or_url, tokenizer, request_top_k=24, model="teacher", max_len=96):
    url = fake_or_url if isinstance(fake_or_url, str) else fake_or_url.url
    settings = ServerTeacherSettings(urls=(url,), model=model, request_top_k=request_top_k, **FAST)
    return check_server_teacher(settings, tokenizer, student="/models/student", max_len=max_len)


def test_a_matching_server_passes(toy_server, toy_tokenizer):
    facts = check(toy_server, toy_tokenizer)
    assert facts.model_id == "teacher" and facts.max_model_len == (97,)
    # the path it was started from is not the name requests use: named, with the name to pass
    with pytest.raises(ArgumentError, match="was started from that model but serves it as 'teacher'"):
        check(toy_server, toy_tokenizer, model="/models/teacher")


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(model="other"), "--teacher.model_name_or_path 'other' is not served at http://127.0.0.1:"),
        (dict(max_len=128), "accepts 97 tokens per sequence (its --max-model-len), but a sample of --data.max_len 128"),
        (dict(request_top_k=100), "restart it with --max-logprobs 100 or more"),
    ],
)
def test_a_wrong_model_name_short_context_or_low_log_prob_limit_is_refused(toy_server, toy_tokenizer, change, words):
    with pytest.raises(ArgumentError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check(toy_server, toy_tokenizer, **change)


def test_another_tokenizer_is_refused(toy_server, toy_tokenizer):
    toy_server.decode_override = {57: "zz"}
    with pytest.raises(ArgumentError) as caught:
        check(toy_server, toy_tokenizer)
    message = str(caught.value)
    assert "does not use the student's tokenizer (--actor.model_name_or_path '/models/student')" in message
    assert f"token id 57 is 'zz' there and {toy_tokenizer.decode([57])!r} in the student's tokenizer" in message

    toy_server.decode_override = {len(toy_tokenizer): "<|extra|>"}
    with pytest.raises(ArgumentError, match=f"it has a token at id {len(toy_tokenizer)}"):
        check(toy_server, toy_tokenizer)

    toy_server.decode_override = {}
    original = toy_server.tokenizer
    toy_server.tokenizer = type(
        "Splitting",
        (),
        {  # same vocabulary, other merges: text splits differently
            "__call__": lambda self, text, add_special_tokens=True: {
                "input_ids": [i % 300 for i in original(text)["input_ids"]][::-1]
            },
            "decode": lambda self, ids: original.decode(ids),
            "__len__": lambda self: len(original),
        },
    )()
    with pytest.raises(ArgumentError, match="tokenizes to"):
        check(toy_server, toy_tokenizer)


def test_a_server_that_answers_logits_or_nothing_is_refused(toy_server, toy_tokenizer):
    toy_server.misbehaviour = Misbehaviour(as_logits=True)
    with pytest.raises(ArgumentError, match="not log-probs"):
        check(toy_server, toy_tokenizer)
    toy_server.die()
    with pytest.raises(ArgumentError, match=r"no vLLM server answered there \(cannot connect"):
        check(toy_server, toy_tokenizer)


# ----------------------------------------------------------------------------- behind the teacher interface


def test_the_driver_teacher_of_a_served_run_is_the_server_teacher_behind_the_interface(monkeypatch):
    """`teachers.driver_teacher` of a run with --teacher.remote_url: candidates from the policy group (a
    stand-in here), then the server's wire dicts per micro-batch, its phases timed; the actor side is
    ShippedSignals; a dead server is the Ray group's kind of stop (TeacherUnavailableError, resume hint)."""
    import ray

    from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
    from tsdkd_plugin.host.teachers import (
        ShippedSignals,
        StepSamples,
        TeacherUnavailableError,
        actor_teacher,
        driver_teacher,
    )
    from tsdkd_plugin.host.teachers.server import ServerDriverTeacher

    batches = micro_batches()
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: [[b["candidate_ids"] for b in batches]])
    policy = type("PolicyGroup", (), {"async_run_method_batch": lambda self, method_name, **batch: ["refs"]})()
    samples = StepSamples(
        sequences=[b["sequences"] for b in batches],
        action_mask=[b["action_mask"] for b in batches],
        attention_mask=[b["attention_mask"] for b in batches],
    )
    with FakeVLLMServer(logits_of, max_logprobs=ROWS) as fake:
        run = RunConfig(
            objective=TSDKDConfig(sparse_top_k=K, num_candidates=4),
            teacher=TeacherConfig("teacher", remote_url=fake.url, remote_top_k=ROWS, timeout_s=2.0, max_retries=1),
        )
        teacher = driver_teacher(
            run,
            policy_group=policy,
            teacher_group=None,
            duplicate_factor=1,
            ckpt_path="/nonexistent/ckpt",
            shared_vocab_size=SHARED,
        )
        assert isinstance(teacher, ServerDriverTeacher) and not run.teacher.has_own_group
        assert isinstance(actor_teacher(run, strategy=None, shared_vocab_size=SHARED), ShippedSignals)
        times = {}
        wires = teacher.signals(samples, times)
        assert len(wires) == 2 and fake.completions == 8
        for wire, batch in zip(wires, batches, strict=True):
            want = reference_wire(batch)
            assert set(wire) == set(want)
            assert torch.equal(wire["topk_ids"], want["topk_ids"])
        assert {
            "tsdkd/time_student_candidates",
            "tsdkd/time_teacher_scoring",
            "tsdkd/teacher_server_retries",
            "tsdkd/teacher_unlisted_mass",
            "tsdkd/teacher_unlisted_candidates",
        } <= set(times)
        fake.die()
        with pytest.raises(TeacherUnavailableError) as stopped:
            teacher.signals(samples, {})
    message = str(stopped.value)
    assert message.startswith(f"TSD-KD stopped: the teacher server (--teacher.remote_url {fake.url})")
    assert "rerun the same command" in message and stop_reason(stopped.value) is stopped.value
    with pytest.raises(ValueError, match="needs the shared vocabulary size"):
        driver_teacher(run, policy_group=policy, teacher_group=None, duplicate_factor=1, ckpt_path="ckpt")
