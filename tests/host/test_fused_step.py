"""The fused student path of the TSD-KD training step (`--tsdkd.student_logits fused`, the default)
against the full-logits path it replaces (`full`), on the real actor.

Fast part (no DeepSpeed): the hidden states the fused path captures are what each model family's
output layer multiplies, and `head(hidden @ W.T)` equals the family's own logits (Qwen2, Qwen3,
Llama, Gemma-2 softcapping, Granite and Cohere scaling); output layers the fused path cannot
reproduce are refused with one sentence.

DeepSpeed part (`slow`): the policy actor built exactly as its Ray worker builds it, in a world of
one (tsdkd_plugin/host/single_process.py), one `TSDKDActorTrainer.training_step` per mode on the
same micro-batch with the same teacher signals. Loss, every logged term and every parameter
gradient (read between backward and the optimizer step) agree within 1e-5 (fp32), under ZeRO-0,
ZeRO-2 (the CPU end-to-end configuration) and ZeRO-3 with the output embedding really partitioned
and gathered, tied and untied embeddings, LoRA students, both teacher transports, a rollout
temperature != 1 and an objective temperature != 1, gradient checkpointing, Qwen2 / Qwen3 /
Gemma-2. The fused step's output layer produces no logits at all ([B, 0, V]).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tsdkd_plugin.host.student_step import (
    StudentForward,
    action_positions,
    fused_output_layer_problem,
    output_layer_skipped,
    student_output_head,
)

TOLERANCE = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module", autouse=True)
def _restore_distributed_env():
    """The world of one these tests start writes MASTER_PORT & co. into os.environ and keeps its
    port bound for the life of the pytest process; later tests' subprocesses must not inherit them."""
    import os

    saved = {name: os.environ.get(name) for name in DIST_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ----------------------------------------------------------------------------- tiny models of each family


def family_config(family: str, rows: int, tied: bool, tokenizer=None):
    """A tiny config of `family` (head_dim 64, 2 layers)."""
    import transformers

    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    common = dict(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=256, tie_word_embeddings=tied, **special)  # fmt: skip
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "gemma2":  # final_logit_softcapping 30 (the default), as Gemma-2-2B/9B-it
        return transformers.Gemma2Config(**common, attn_logit_softcapping=None, final_logit_softcapping=30.0)
    if family == "granite":
        return transformers.GraniteConfig(**common, logits_scaling=8.0)
    if family == "cohere":
        return transformers.CohereConfig(**common, logit_scale=0.0625)
    raise ValueError(family)


def make_model(config, seed: int = 0, boost: float = 40.0):
    """Seeded random weights; the output embedding is multiplied by `boost` (random init gives logits
    of about +-1; x40 gives +-20..40, where Gemma-2's softcapping at 30 matters)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(boost)
    return model.eval()


FAMILIES = ("qwen2", "qwen3", "llama", "gemma2", "granite", "cohere")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_equal_the_familys_own(family):
    model = make_model(family_config(family, rows=96, tied=family in ("gemma2", "qwen2")))
    sequences = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(sequences)
    attention_mask[1, :3] = 0  # left padding, as OpenRLHF batches have
    with torch.no_grad():
        own = model(sequences, attention_mask=attention_mask).logits
        student = StudentForward(model)
        outputs = student(model, sequences, attention_mask, num_actions=5)
    reference = action_positions(own, 5)
    raw = outputs.hidden @ model.get_output_embeddings().weight.t()
    made = student.head.apply_(raw.clone())
    assert outputs.logits is None and outputs.hidden.shape == (2, 5, 64)
    assert torch.allclose(made, reference, rtol=1e-5, atol=1e-4), (family, (made - reference).abs().max())
    # Where the family has a head transform, it matters at these logits (not a near-identity check).
    assert student.head.is_identity == (family in ("qwen2", "qwen3", "llama"))
    assert student.head.is_identity or (made - raw).abs().max() > 1.0


class ActorLike(torch.nn.Module):
    """Upstream Actor's call signature around a Hugging Face model (logits upcast and divided by the
    rollout temperature, as Actor.forward does)."""

    def __init__(self, model, temperature=1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, sequences, attention_mask=None, return_output=False, ring_attn_group=None):
        output = self.model(sequences, attention_mask=attention_mask)
        output["logits"] = output["logits"].float() / self.temperature
        return output


def test_output_layer_sees_no_positions_and_the_capture_is_the_final_hidden_state():
    model = make_model(family_config("qwen2", rows=96, tied=True))
    sequences = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final = model(sequences, output_hidden_states=True).hidden_states[-1]  # after the final norm
        with output_layer_skipped(model.get_output_embeddings()) as captured:
            skipped = model(sequences).logits
    assert skipped.shape == (3, 0, 96) and captured.calls == 1
    assert torch.equal(captured.hidden, final)


def test_full_mode_undoes_the_rollout_temperature():
    model = make_model(family_config("qwen2", rows=96, tied=True))
    sequences = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = action_positions(model(sequences).logits, 3)
        outputs = StudentForward(model, "full")(ActorLike(model, temperature=0.7), sequences, torch.ones_like(sequences), 3)
    assert torch.allclose(outputs.logits, raw, rtol=1e-6, atol=1e-5)


def test_output_layers_the_fused_path_cannot_reproduce_are_refused():
    from peft import LoraConfig, get_peft_model

    model = make_model(family_config("qwen2", rows=96, tied=False))
    lora_on_lm_head = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError) as refused:
        StudentForward(lora_on_lm_head)
    message = str(refused.value)
    assert "qwen2" in message and "--tsdkd.student_logits full" in message and "LoRA" in message
    StudentForward(lora_on_lm_head, "full")  # the full path computes what the model computes

    assert "bias" in fused_output_layer_problem(torch.nn.Linear(4, 8, bias=True))
    assert fused_output_layer_problem(torch.nn.Linear(4, 8, bias=False)) is None
    with pytest.raises(ValueError, match="--tsdkd.student_logits must be one of fused, full"):
        StudentForward(model, "chunked")


def test_output_heads_of_the_recipe_families():
    assert student_output_head(family_config("qwen2", 96, True)).is_identity
    assert student_output_head(family_config("qwen3", 96, True)).is_identity
    gemma = student_output_head(family_config("gemma2", 96, True))
    assert gemma.softcap == 30.0 and gemma.scale == 1.0


def test_the_flag_defaults_to_fused():
    from tsdkd_plugin.cli.train_tsdkd import build_parser

    from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
    from tsdkd_plugin.objective import TSDKDConfig

    parser, _ = build_parser()
    assert getattr(parser.parse_args([]), "tsdkd.student_logits") == "fused"
    assert getattr(parser.parse_args(["--tsdkd.student_logits", "full"]), "tsdkd.student_logits") == "full"
    with pytest.raises(ValueError, match="--tsdkd.student_logits must be one of fused, full, got 'chunked'"):
        RunConfig(objective=TSDKDConfig(), teacher=TeacherConfig("teacher"), student_logits="chunked")


@pytest.mark.parametrize("flags, named", [
    (["--ds.packing_samples"], "--ds.packing_samples is not supported"),
    (["--ds.ring_attn_size", "2"], "--ds.ring_attn_size 2 needs --ds.packing_samples"),
])
def test_packing_and_ring_attention_are_refused_before_launch(flags, named, capsys):
    """Upstream turns packing on for ring attention; the objective works on padded rows."""
    from tsdkd_plugin.cli.train_tsdkd import parse_args

    argv = ["--actor.model_name_or_path", "s", "--teacher.model_name_or_path", "t", "--data.prompt_dataset", "p",
            "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "2", "--ds.attn_implementation", "sdpa", *flags]
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and named in message


# ----------------------------------------------------------------------------- the real actor under DeepSpeed


def save_student(out_dir: Path, tokenizer_dir: Path, family: str, rows: int, tied: bool) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    boost = 40.0 if family == "gemma2" else 8.0  # LM-like spread of logits; Gemma-2's past its softcap
    make_model(family_config(family, rows, tied, tokenizer), seed=7, boost=boost).save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


# The CPU end-to-end configuration (tests/host/test_tsdkd_e2e.py): fp32, sdpa, both ListMLE levels,
# K = 16, n = 4 per prompt; here two prompts per micro-batch and one optimizer step per micro-batch,
# so the gradient read before the step is the micro-batch's own.
N_PER_PROMPT, PROMPTS, PROMPT_LEN, RESPONSE_LEN = 4, 2, 6, 9


def tsdkd_argv(student, teacher, placement, zero_stage, extra=()):
    batch = N_PER_PROMPT * PROMPTS
    return [
        "--actor.model_name_or_path", str(student), "--teacher.model_name_or_path", str(teacher),
        "--teacher.placement", placement, "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--data.prompt_dataset", "unused.jsonl", "--rollout.n_samples_per_prompt", str(N_PER_PROMPT),
        "--rollout.batch_size", str(PROMPTS), "--rollout.micro_batch_size", str(N_PER_PROMPT),
        "--train.batch_size", str(batch), "--train.micro_batch_size", str(batch),
        "--ds.zero_stage", str(zero_stage), "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa",
        "--actor.adam.lr", "1e-3", "--actor.lr_warmup_ratio", "0",
        "--tsdkd.indirect_level", "both", "--teacher.sparse_top_k", "16", "--tsdkd.chunk_size", "7", *extra,
    ]  # fmt: skip


def rollout_batch(shared: int, seed: int):
    """[prompt (left-padded) | response (right-padded)] rows; one response samples a padding-row id."""
    generator = torch.Generator().manual_seed(seed)
    rows = N_PER_PROMPT * PROMPTS
    sequences = torch.randint(0, shared, (rows, PROMPT_LEN + RESPONSE_LEN), generator=generator)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(rows, RESPONSE_LEN, dtype=torch.bool)
    for row in range(rows):
        pad = row % 3
        attention_mask[row, :pad] = 0
        sequences[row, :pad] = 0
        length = RESPONSE_LEN - (row * 2) % 5
        action_mask[row, length:] = False
        attention_mask[row, PROMPT_LEN + length :] = 0
        sequences[row, PROMPT_LEN + length :] = 0
    sequences[1, PROMPT_LEN + 2] = shared + 5  # a padding row of the student's lm_head, sampled
    return sequences, attention_mask, action_mask


def trainable_gradients_at_step(policy, experience):
    """Run the real training step; return its status and every trainable parameter's full gradient,
    read between backward and the optimizer step (ZeRO partitions included)."""
    from deepspeed.utils import safe_get_full_grad

    trainer = policy.trainer
    gradients, output_shapes = {}, []
    step = trainer.strategy.optimizer_step

    def read_gradients_then_step(optimizer, model, scheduler, **kwargs):
        for name, param in model.model.module.named_parameters():
            if param.requires_grad:
                grad = safe_get_full_grad(param)
                gradients[name] = None if grad is None else grad.detach().double().flatten().clone()
        return step(optimizer, model, scheduler, **kwargs)

    from tsdkd_plugin.host.model_io import unwrap_hf_model

    watch = unwrap_hf_model(policy.actor).get_output_embeddings().register_forward_hook(
        lambda module, args, out: output_shapes.append(tuple(out.shape))
    )
    trainer.strategy.optimizer_step = read_gradients_then_step
    try:
        status = trainer.training_step(experience, 0.0, 0)
    finally:
        del trainer.strategy.optimizer_step
        watch.remove()
    return status, gradients, output_shapes


def scalar(value) -> float:
    return float(value.float().mean()) if isinstance(value, torch.Tensor) else float(value)


CASES = {
    # id: (student family, logit rows, tied, zero stage, placement, extra flags)
    "zero0-separate-qwen2-tied-checkpointing": ("qwen2", 448, True, 0, "separate",
                                                ("--actor.gradient_checkpointing_enable",)),
    "zero2-colocate-qwen2-tied-e2e-config": ("qwen2", 448, True, 2, "colocate", ()),
    # 2048 x 64 rows exceed ZeRO-3's persistence threshold: the output embedding is partitioned and gathered.
    "zero3-colocate-qwen2-tied-temperature0.7": ("qwen2", 2048, True, 3, "colocate", ("--rollout.temperature", "0.7")),
    "zero3-separate-qwen2-untied-lora": ("qwen2", 2048, False, 3, "separate", ("--ds.lora.rank", "4", "--ds.lora.alpha", "8")),
    "zero0-colocate-qwen3-untied-lora-tau2": ("qwen3", 448, False, 0, "colocate",
                                             ("--ds.lora.rank", "4", "--ds.lora.alpha", "8", "--rollout.temperature",
                                              "1.3", "--tsdkd.temperature", "2.0")),
    "zero0-separate-gemma2-softcap": ("gemma2", 448, True, 0, "separate", ()),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fused_training_step_equals_the_full_logits_step(case, tmp_path, toy_tokenizer_dir, toy_teacher_dir):
    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host import single_process
    from tsdkd_plugin.host.model_io import unwrap_hf_model
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    family, rows, tied, zero_stage, placement, extra = CASES[case]
    student = save_student(tmp_path / "student", Path(toy_tokenizer_dir), family, rows, tied)
    shared = check_same_tokenizer(str(toy_teacher_dir), str(student))
    runs = {}
    for mode in ("full", "fused"):
        args, run_config = parse_args(tsdkd_argv(student, toy_teacher_dir, placement, zero_stage,
                                                 (*extra, "--tsdkd.student_logits", mode)))  # fmt: skip
        runs[mode] = {"policy": single_process.build_policy_actor(args, run_config, shared)}
    teacher = None if placement == "colocate" else single_process.build_separate_teacher(args, run_config, shared)

    sequences, attention_mask, action_mask = rollout_batch(shared, seed=11)
    candidates = {mode: run["policy"].student_candidates(sequences, action_mask, attention_mask)
                  for mode, run in runs.items()}  # fmt: skip
    # Both modes propose the same top-k (up to ties): the fused ids hold the full logits' top-k values.
    with torch.no_grad():
        full_policy = runs["full"]["policy"]
        logits = full_policy.trainer._student_forward(sequences, attention_mask, RESPONSE_LEN).logits[..., :shared]
        top_values = logits.topk(run_config.objective.num_candidates, dim=-1).values
        fused_values = logits.gather(-1, candidates["fused"].long()).sort(-1, descending=True).values
    assert torch.allclose(fused_values, top_values, rtol=0, atol=1e-5)

    for mode, run in runs.items():
        # The same signals for both: the separate teacher scored the full mode's candidates.
        experience = single_process.experience_with_signals(
            run["policy"], teacher, sequences, attention_mask, action_mask, N_PER_PROMPT, candidates["full"]
        )
        if zero_stage == 3 and mode == "fused":
            weight = unwrap_hf_model(run["policy"].actor).get_output_embeddings().weight
            assert weight.numel() == 0, "the output embedding should be partitioned outside the step (ZeRO-3)"
        run["status"], run["grads"], run["output_shapes"] = trainable_gradients_at_step(run["policy"], experience)

    assert all(shape[-2] == 0 for shape in runs["fused"]["output_shapes"]), runs["fused"]["output_shapes"]
    assert all(shape[-2] == PROMPT_LEN + RESPONSE_LEN for shape in runs["full"]["output_shapes"])

    full, fused = runs["full"]["status"]["metrics"], runs["fused"]["status"]["metrics"]
    assert set(full) == set(fused)
    assert scalar(full["tsdkd/out_of_vocab_fraction"]) > 0 and scalar(full["tsdkd/loss_indirect_sequence"]) > 0
    assert scalar(full["tsdkd/nonfinite_skipped"]) == 0
    for key in full:
        if key.startswith("tsdkd/") or key == "policy_loss":
            a, b = scalar(fused[key]), scalar(full[key])
            assert math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-7), (key, a, b)

    full_grads, fused_grads = runs["full"]["grads"], runs["fused"]["grads"]
    assert set(full_grads) == set(fused_grads) and full_grads
    if "--ds.lora.rank" in extra:
        assert all("lora_" in name for name in full_grads)  # only the adapters train
    for name, reference in full_grads.items():
        assert reference is not None and fused_grads[name] is not None, name
        scale = reference.abs().max()
        # LoRA's B starts at zero, so its A matrices get exactly zero gradient at the first step.
        assert scale > 0 or ".lora_A." in name, f"{name}: no gradient reached it"
        error = (fused_grads[name] - reference).abs().max()
        assert error <= TOLERANCE * scale, f"{name}: gradient differs by {error:.3g} (max-normalised {error / scale:.3g})"


@pytest.mark.slow
def test_a_skipped_micro_batch_under_zero3_gives_every_parameter_a_zero_gradient(
    tmp_path, toy_tokenizer_dir, toy_teacher_dir
):
    """The non-finite skip backpropagates a zero tied to the hidden states only; under ZeRO-3 with an
    untied, partitioned output layer (which then gets no gradient at all) the step must still run."""
    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host import single_process
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    student = save_student(tmp_path / "student", Path(toy_tokenizer_dir), "qwen2", 2048, tied=False)
    shared = check_same_tokenizer(str(toy_teacher_dir), str(student))
    args, run = parse_args(tsdkd_argv(student, toy_teacher_dir, "separate", 3))
    policy = single_process.build_policy_actor(args, run, shared)
    teacher = single_process.build_separate_teacher(args, run, shared)
    sequences, attention_mask, action_mask = rollout_batch(shared, seed=12)
    experience = single_process.experience_with_signals(policy, teacher, sequences, attention_mask, action_mask,
                                                        N_PER_PROMPT)  # fmt: skip
    experience.tsdkd["entropy"][0, 0] = float("nan")
    status, grads, _ = trainable_gradients_at_step(policy, experience)
    assert status["metrics"]["tsdkd/nonfinite_skipped"] == 1.0
    assert grads and all(g is None or not g.any() for g in grads.values())
    assert grads["lm_head.weight"] is None or not grads["lm_head.weight"].any()
