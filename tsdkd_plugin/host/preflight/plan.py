"""What will be launched: the GPUs each group needs, the cluster check, and the resolved plan
the preflight returns (printed by --tsdkd.dry_run)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.host.preflight.models import ModelFacts, Models
from tsdkd_plugin.host.run_config import RunConfig


def required_gpus(args: SimpleNamespace) -> dict[str, int]:
    actor = args.actor.num_nodes * args.actor.num_gpus_per_node
    vllm = args.vllm.num_engines * args.vllm.tensor_parallel_size
    teacher = args.teacher.num_nodes * args.teacher.num_gpus_per_node if args.teacher.placement == "separate" else 0
    plan = {"actor": actor, "teacher": teacher, "vllm": vllm}
    plan["total"] = max(actor, vllm) + teacher if args.train.colocate_all else actor + teacher + vllm
    return plan


def check_cluster_capacity(args: SimpleNamespace, cluster_gpus: float) -> None:
    plan = required_gpus(args)
    if plan["total"] > cluster_gpus:
        raise ArgumentError(
            f"the launch needs {plan['total']} GPUs (actor {plan['actor']} via --actor.num_nodes x "
            f"--actor.num_gpus_per_node, teacher {plan['teacher']} via --teacher.*, vLLM {plan['vllm']} via "
            f"--vllm.num_engines x --vllm.tensor_parallel_size{', colocated' if args.train.colocate_all else ''}) "
            f"but the Ray cluster has {cluster_gpus:g}; lower those flags or add nodes"
        )


def _model_summary(facts: ModelFacts) -> dict:
    _, layers = facts.setting("num_hidden_layers", "n_layer", "num_layers")
    _, limit = facts.position_limit()
    return {"path": facts.path, "layers": layers, "logit_rows": getattr(facts.config, "vocab_size", None),
            "position_limit": limit, "weight_files": len(facts.weight_files) or None}


def resolved_plan(args: SimpleNamespace, run: RunConfig, models: Models | None = None,
                  prompts: int | None = None) -> dict:
    """What will be launched, as --tsdkd.dry_run prints it. Without `models` (the recipe checks, which
    read no model), the parts that need them are None."""
    teacher, separate = run.teacher, run.teacher.has_own_group
    return {
        "policy": {"nodes": args.actor.num_nodes, "gpus_per_node": args.actor.num_gpus_per_node,
                   "model": args.actor.model_name_or_path, "zero_stage": args.ds.zero_stage},
        "vllm": {"engines": args.vllm.num_engines, "tensor_parallel_size": args.vllm.tensor_parallel_size,
                 "colocated_with_policy": bool(args.train.colocate_all)},
        "teacher": {"placement": teacher.placement, "model": teacher.model_name_or_path,
                    "nodes": teacher.num_nodes if separate else args.actor.num_nodes,
                    "gpus_per_node": teacher.num_gpus_per_node if separate else 0,
                    "transport": f"sparse top-{run.objective.sparse_top_k}" if separate else "dense"},
        "gpus": required_gpus(args),
        "shared_vocab_size": models.shared_vocab_size if models else None,
        "models": {"student": _model_summary(models.student), "teacher": _model_summary(models.teacher)}
        if models else None,
        "prompts_per_episode": prompts,
        "objective": run.objective.to_dict(),
        "rollout": {"n_samples_per_prompt": args.rollout.n_samples_per_prompt, "batch_size": args.rollout.batch_size,
                    "max_new_tokens": args.rollout.max_new_tokens, "temperature": args.rollout.temperature},
    }


@dataclass(frozen=True)
class LaunchPlan:
    """The launch the preflight accepted: what the CLI needs to start it, and its summary."""

    shared_vocab_size: int
    prompts: int | None  # prompts per episode, when every dataset is a local file
    summary: dict  # resolved_plan(...): what --tsdkd.dry_run prints

    def as_dict(self) -> dict:
        return self.summary
