"""--tsdkd.weight_warmup_steps in the actor: each micro-batch's objective is the run's config at the
optimizer step the student is on (TSDKDConfig.at_step), logged as tsdkd/weight_warmup_factor, and a
resumed run continues the step count instead of warming up again.

Fast part: the step's config and metrics (`objective_at_step`) and where the actor reads its step
(DeepSpeed's `global_steps`). Slow part: the real training step in a DeepSpeed world of one
(host/single_process.py), three optimizer steps, a checkpoint and a resume from it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tsdkd_plugin.host.student_step import objective_at_step
from tsdkd_plugin.objective import BALANCE_KEYS, TSDKDConfig


def test_the_step_config_and_its_metric():
    run = TSDKDConfig(indirect_level="both", weight_warmup_steps=4)
    for step, factor in ((0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        config, metrics = objective_at_step(run, step)
        assert config == run.at_step(step) and metrics == {"weight_warmup_factor": factor}
        assert (config.indirect_weight, config.sequence_weight) == (0.1 * factor, 0.1 * factor)
        assert config.entropy_weight == factor and config.direct_weight == 1.0
    # Without a warm-up the run's own config, and no metric (the same keys at every step).
    assert objective_at_step(TSDKDConfig(), 3) == (TSDKDConfig(), {})
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        objective_at_step(run, -1)


def test_the_actor_counts_the_optimizer_steps_deepspeed_saves_and_restores():
    from tsdkd_plugin.host.actor import TSDKDActorTrainer

    trainer = object.__new__(TSDKDActorTrainer)  # only the attribute the count is read from
    trainer.actor = SimpleNamespace(model=SimpleNamespace(global_steps=7))
    assert trainer.optimizer_steps_taken() == 7


# ----------------------------------------------------------------------------- the real step, resumed

N_PER_PROMPT, PROMPTS, PROMPT_LEN, RESPONSE_LEN = 2, 2, 5, 7


def warmup_argv(student, teacher, ckpt_dir):
    batch = N_PER_PROMPT * PROMPTS
    return [
        "--actor.model_name_or_path", str(student), "--teacher.model_name_or_path", str(teacher),
        "--teacher.placement", "colocate", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--data.prompt_dataset", "unused.jsonl", "--rollout.n_samples_per_prompt", str(N_PER_PROMPT),
        "--rollout.batch_size", str(PROMPTS), "--rollout.micro_batch_size", str(N_PER_PROMPT),
        # one optimizer step per micro-batch
        "--train.batch_size", str(batch), "--train.micro_batch_size", str(batch),
        "--ds.zero_stage", "0", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa",
        "--actor.adam.lr", "1e-4", "--actor.lr_warmup_ratio", "0",
        "--tsdkd.indirect_level", "both", "--tsdkd.chunk_size", "16",
        "--tsdkd.weight_warmup_steps", "4", "--tsdkd.term_balance", "grad_norm",
        "--ckpt.path", str(ckpt_dir), "--ckpt.load_enable",
    ]  # fmt: skip


def micro_batch(shared: int):
    generator = torch.Generator().manual_seed(5)
    rows = N_PER_PROMPT * PROMPTS
    sequences = torch.randint(3, shared, (rows, PROMPT_LEN + RESPONSE_LEN), generator=generator)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(rows, RESPONSE_LEN, dtype=torch.bool)
    action_mask[1, 5:] = False
    attention_mask[1, PROMPT_LEN + 5 :] = 0
    return sequences, attention_mask, action_mask


def extra_terms(metrics) -> float:
    """The extra terms' part of the loss from the logged values: sum of weight * balance scale * term,
    with the run's weights (entropy 1, token 0.1, sequence 0.1) before the warm-up."""
    parts = (("entropy", 1.0, "loss_entropy"), ("indirect_token", 0.1, "loss_indirect_token"),
             ("indirect_sequence", 0.1, "loss_indirect_sequence"))  # fmt: skip
    return sum(w * metrics[f"tsdkd/balance_scale_{name}"] * metrics[f"tsdkd/{key}"] for name, w, key in parts)


@pytest.mark.slow
def test_the_warmup_reaches_the_loss_and_a_resume_continues_it(tmp_path, toy_student_dir, toy_teacher_dir):
    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host import single_process
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    shared = check_same_tokenizer(str(toy_teacher_dir), str(toy_student_dir))
    args, run = parse_args(warmup_argv(toy_student_dir, toy_teacher_dir, tmp_path / "ckpt"))
    policy = single_process.build_policy_actor(args, run, shared, max_steps=8)
    sequences, attention_mask, action_mask = micro_batch(shared)
    experience = single_process.experience_with_signals(
        policy, None, sequences, attention_mask, action_mask, N_PER_PROMPT
    )
    logged = []
    for _ in range(3):
        logged.append({k: float(torch.as_tensor(v).float().mean()) for k, v in
                       policy.trainer.training_step(experience, 0.0, 0)["metrics"].items()})  # fmt: skip
    assert [m["tsdkd/weight_warmup_factor"] for m in logged] == [0.0, 0.25, 0.5]
    assert policy.trainer.optimizer_steps_taken() == 3
    # Step 0: the extra terms' weights are 0 -- the loss is the direct term alone, nothing to balance.
    first = logged[0]
    assert first["policy_loss"] == first["tsdkd/loss_direct"] and first["tsdkd/loss_entropy"] == 0.0
    assert all(first[f"tsdkd/{key}"] == 1.0 for key in BALANCE_KEYS)
    # Later steps: the warmed-up weights, balanced, reach the loss.
    for metrics in logged[1:]:
        factor = metrics["tsdkd/weight_warmup_factor"]
        assert metrics["tsdkd/balance_scale_entropy"] != 1.0 and metrics["tsdkd/loss_indirect_token"] > 0
        expected = metrics["tsdkd/loss_direct"] + factor * extra_terms(metrics)
        assert metrics["policy_loss"] == pytest.approx(expected, rel=1e-5)

    policy.save_checkpoint("global_step3", {"global_step": 3, "episode": 0, "total_consumed_prompts": 3 * PROMPTS})
    resumed = single_process.build_policy_actor(args, run, shared, max_steps=8)
    assert resumed.trainer.optimizer_steps_taken() == 3  # continued, not restarted at 0
    status = resumed.trainer.training_step(experience, 0.0, 0)
    assert status["metrics"]["tsdkd/weight_warmup_factor"] == 0.75
