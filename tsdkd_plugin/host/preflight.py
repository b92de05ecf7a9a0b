"""Checks that run before any Ray worker starts, so a wrong launch fails in seconds.

Every failure is an `ArgumentError` whose message is one sentence naming the
option or file and what would be valid. The CLI prints it without a traceback.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Dict, List, Optional

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.objective import TSDKDConfig

LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def _looks_local(path: str) -> bool:
    return path.startswith(LOCAL_PATH_PREFIXES) or os.path.exists(path)


REQUIRED_OPTION_HINTS = {
    "--actor.model_name_or_path": "the student: a HF model name or a local model directory",
    "--teacher.model_name_or_path": "the teacher: a HF model name or a local model directory using the student's tokenizer",
    "--data.prompt_dataset": "a JSONL file, a dataset directory or a HF dataset name",
}


def require_option(option: str, value) -> None:
    if value in (None, ""):
        raise ArgumentError(f"{option} is required: {REQUIRED_OPTION_HINTS.get(option, 'set it')}")


def check_model_path(option: str, path: Optional[str]) -> None:
    require_option(option, path)
    if _looks_local(path):
        expanded = os.path.expanduser(path)
        if not os.path.isdir(expanded):
            raise ArgumentError(f"{option} {path!r} does not exist or is not a directory")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ArgumentError(f"{option} {path!r} has no config.json; point it at a saved HF model directory")


def shared_vocabulary_size(student_path: str, teacher_path: str) -> int:
    """len(tokenizer) when both models use the same tokenizer, else an ArgumentError.

    Logit rows beyond len(tokenizer) are padding (e.g. 151,936 vs 152,064 for Qwen2.5
    1.5B vs 14B), so distributions are compared on ids [0, len(tokenizer)).
    """
    from transformers import AutoConfig

    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    try:
        shared = check_same_tokenizer(
            teacher_path, student_path,
            f"--teacher.model_name_or_path {teacher_path!r}", f"--actor.model_name_or_path {student_path!r}",
        )
    except ValueError as error:
        raise ArgumentError(f"{error} Pick a teacher from the student's model family.") from None
    for option, path in (("--actor.model_name_or_path", student_path), ("--teacher.model_name_or_path", teacher_path)):
        rows = getattr(AutoConfig.from_pretrained(path, trust_remote_code=True), "vocab_size", None)
        if rows is not None and rows < shared:
            raise ArgumentError(
                f"{option} {path!r} has {rows} logit rows but its tokenizer has {shared} tokens; "
                f"the model and tokenizer do not belong together"
            )
    return shared


def _first_rows(dataset: str, split: str, count: int = 3) -> List[Dict]:
    """A few rows of a prompt dataset, read the way OpenRLHF will (local file/dir or hub)."""
    spec = dataset.split(",")[0].strip()
    if os.path.isfile(spec) and spec.endswith((".jsonl", ".json")):
        rows = []
        with open(spec, encoding="utf-8") as handle:
            if spec.endswith(".jsonl"):
                for line_number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ArgumentError(f"--data.prompt_dataset {spec!r} line {line_number} is not valid JSON ({error.msg})")
                    if len(rows) >= count:
                        break
            else:
                try:
                    data = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ArgumentError(f"--data.prompt_dataset {spec!r} is not valid JSON ({error.msg})")
                rows = data[:count] if isinstance(data, list) else []
        if not rows:
            raise ArgumentError(f"--data.prompt_dataset {spec!r} has no rows")
        return rows
    if _looks_local(spec) and not os.path.exists(spec):
        raise ArgumentError(f"--data.prompt_dataset {spec!r} does not exist")
    import datasets

    stream = datasets.load_dataset(spec, split=split, streaming=True)
    return [row for _, row in zip(range(count), stream)]


def check_prompt_dataset(args: SimpleNamespace) -> None:
    require_option("--data.prompt_dataset", args.data.prompt_dataset)
    rows = _first_rows(args.data.prompt_dataset, args.data.prompt_split)
    key = args.data.input_key
    missing = [i for i, row in enumerate(rows) if key not in row]
    if missing:
        raise ArgumentError(
            f"--data.prompt_dataset rows have no key {key!r} (--data.input_key); "
            f"available keys: {sorted(rows[missing[0]].keys())}"
        )


def check_objective_vs_rollout(args: SimpleNamespace, config: TSDKDConfig) -> None:
    n = args.rollout.n_samples_per_prompt
    if config.sequence_level_on:
        if n < 2:
            raise ArgumentError(
                f"--tsdkd.indirect_level {config.indirect_level!r} ranks a prompt's candidates, which needs "
                f"--rollout.n_samples_per_prompt >= 2 (got {n}); or use --tsdkd.indirect_level token"
            )
        for option, value in (("--rollout.micro_batch_size", args.rollout.micro_batch_size),
                              ("--train.micro_batch_size", args.train.micro_batch_size)):
            if value % n:
                raise ArgumentError(
                    f"{option} ({value}) must be a multiple of --rollout.n_samples_per_prompt ({n}) so a prompt's "
                    f"candidates stay in one micro-batch for sequence-level ranking"
                )
    if not 0.0 <= args.tsdkd.on_policy_fraction <= 1.0:
        raise ArgumentError(f"--tsdkd.on_policy_fraction must be in [0, 1], got {args.tsdkd.on_policy_fraction}")
    if args.tsdkd.on_policy_fraction < 1.0 and not args.data.label_key:
        raise ArgumentError(
            "--tsdkd.on_policy_fraction < 1 trains some steps on the dataset's reference responses: set "
            "--data.label_key to the response column"
        )
    if not args.vllm.num_engines or args.vllm.num_engines < 1:
        raise ArgumentError("--vllm.num_engines must be >= 1: TSD-KD samples the student's candidates with vLLM")
    if args.train.dynamic_batch_enable:
        raise ArgumentError("--train.dynamic_batch_enable is not supported by TSD-KD yet (teacher signals are batched per micro-batch)")
    if args.ds.lora.rank > 0:
        raise ArgumentError(
            "--ds.lora.rank > 0 is not supported by TSD-KD yet: OpenRLHF's weight sync sends LoRA parameter "
            "names that the vLLM engines do not have; train full weights (use ZeRO-3 / --ds.adam_offload for memory)"
        )
    if args.ds.packing_samples:
        raise ArgumentError("--ds.packing_samples is not supported by TSD-KD yet; drop the flag")


def required_gpus(args: SimpleNamespace) -> Dict[str, int]:
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


def resolved_plan(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> Dict:
    """What will be launched, for --tsdkd.dry_run and the run log."""
    gpus = required_gpus(args)
    return {
        "policy": {"nodes": args.actor.num_nodes, "gpus_per_node": args.actor.num_gpus_per_node,
                   "model": args.actor.model_name_or_path, "zero_stage": args.ds.zero_stage},
        "vllm": {"engines": args.vllm.num_engines, "tensor_parallel_size": args.vllm.tensor_parallel_size,
                 "colocated_with_policy": bool(args.train.colocate_all)},
        "teacher": {"placement": args.teacher.placement, "model": args.teacher.model_name_or_path,
                    "nodes": args.teacher.num_nodes if args.teacher.placement == "separate" else args.actor.num_nodes,
                    "gpus_per_node": args.teacher.num_gpus_per_node if args.teacher.placement == "separate" else 0,
                    "transport": f"sparse top-{args.teacher.sparse_top_k}" if args.teacher.placement == "separate" else "dense"},
        "gpus": gpus,
        "shared_vocab_size": shared_vocab_size,
        "objective": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "rollout": {"n_samples_per_prompt": args.rollout.n_samples_per_prompt, "batch_size": args.rollout.batch_size,
                    "max_new_tokens": args.rollout.max_new_tokens, "temperature": args.rollout.temperature},
    }
