"""Per-GPU memory of each recipe's groups, from model configs: why a recipe uses its layout.

    python -m tsdkd_plugin.recipes_tools.memory                       # every recipe, markdown
    python -m tsdkd_plugin.recipes_tools.memory recipes/tsdkd/qwen2.5-14b_to_1.5b.1node.sh
    STUDENT_MODEL=/models/my-1b python -m tsdkd_plugin.recipes_tools.memory recipes/tsdkd/...   # local config.json
    python -m tsdkd_plugin.recipes_tools.memory --config student=path/config.json recipes/...  # override a role
    python -m tsdkd_plugin.recipes_tools.memory --write docs/memory.md                        # regenerate the doc

The recipe's own command line (parsed by recipe_check with the real parsers) gives the layout:
GPUs per group, ZeRO stage, Adam offload, LoRA rank, micro-batches, sequence length, vLLM
engines and memory fraction, teacher placement. Model sizes come from KNOWN_CONFIGS (the
paper's models; no hub access) or from a local model directory's config.json.

The estimate, per GPU, in GiB (2**30 bytes):
- policy: bf16 weights (2 B/param), bf16 gradients (2 B/param), fp32 Adam master copy + two
  moments (12 B/param). ZeRO-1 shards the Adam part over the group, ZeRO-2 also gradients,
  ZeRO-3 also weights; --ds.adam_offload moves the Adam part to CPU. LoRA: frozen bf16 base
  plus full training state for the adapters only.
- activations: with gradient checkpointing, one bf16 hidden state per layer per token plus
  one layer's working set (about 16 x hidden + 6 x MLP width bytes per token); without, every
  layer's working set.
- logits: the training micro-batch's full-vocabulary logits and their gradient in bf16
  (4 B per token per vocabulary row), plus the TSD-KD objective's chunked fp32 workspace
  (6 x chunk x vocabulary x 4 B). A colocated teacher adds its own dense logits (2 B).
- teacher (own GPUs): bf16 weights (ZeRO-3 shards them over the teacher group), forward
  working set and logits of one rollout micro-batch (bf16 logits + fp32 log-probs, 6 B).
- vLLM: bf16 weights / tensor parallel size; the KV cache gets the rest of
  gpu_memory_utilization x GPU memory, shown with how many tokens (and full-length
  sequences) it holds.
- overhead: CUDA context, NCCL buffers, allocator fragmentation: a flat 2 GiB per process.
Colocated recipes (--train.colocate_all with sleep modes) have two phases that do not overlap:
training (policy + colocated teacher) and generation (vLLM + whatever stays resident); the
peak is the larger.
These are planning numbers from first principles, not yet compared with measured peaks on
GPUs: leave headroom.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
OVERHEAD_GIB = 2.0
DEFAULT_GPU_MEMORY_GB = 80
GPU_MEMORY_MARKER = "# gpu-memory-gb:"
OBJECTIVE_CHUNK = 256  # TSDKDConfig.chunk_size default


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on; read from a HF config.json."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_rows: int  # logit rows (the embedding matrix), not len(tokenizer)
    tied_embeddings: bool
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    norms_per_layer: int = 2  # Gemma-2 has 4
    qk_norm: bool = False  # Qwen3

    @classmethod
    def from_config(cls, name: str, config: Mapping) -> ModelShape:
        text = config.get("text_config", config)  # multimodal wrappers keep the LM under text_config
        try:
            heads = text["num_attention_heads"]
            hidden = text["hidden_size"]
            model_type = text.get("model_type", "")
            return cls(
                name=name,
                hidden_size=hidden,
                intermediate_size=text["intermediate_size"],
                num_layers=text["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=text.get("num_key_value_heads") or heads,
                head_dim=text.get("head_dim") or hidden // heads,
                vocab_rows=text["vocab_size"],
                tied_embeddings=bool(text.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bool(text.get("attention_bias", False)),
                norms_per_layer=4 if model_type.startswith("gemma2") or model_type.startswith("gemma3") else 2,
                qk_norm=model_type.startswith("qwen3"),
            )
        except KeyError as missing:
            raise ValueError(f"{name}: config has no {missing}; a decoder-only causal LM config is expected") from None

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer (what LoRA all-linear targets)."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes())
        if self.attention_bias:
            per_layer += self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim
        per_layer += self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        embeddings = self.vocab_rows * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def lora_parameters(self, rank: int) -> int:
        return self.num_layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2  # K and V, bf16


def _config(hidden, intermediate, layers, heads, kv_heads, vocab, tied, model_type, head_dim=None) -> dict:
    config = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "model_type": model_type,
    }
    if head_dim:
        config["head_dim"] = head_dim
    return config


# The paper's models, copied from their config.json files (no hub here).
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-1.5B-Instruct": _config(1536, 8960, 28, 12, 2, 151936, True, "qwen2"),
    "Qwen/Qwen2.5-14B-Instruct": _config(5120, 13824, 48, 40, 8, 152064, False, "qwen2"),
    "google/gemma-2-2b-it": _config(2304, 9216, 26, 8, 4, 256000, True, "gemma2", head_dim=256),
    "google/gemma-2-9b-it": _config(3584, 14336, 42, 16, 8, 256000, True, "gemma2", head_dim=256),
    "Qwen/Qwen3-1.7B": _config(2048, 6144, 28, 16, 8, 151936, True, "qwen3", head_dim=128),
    "Qwen/Qwen3-8B": _config(4096, 12288, 36, 32, 8, 151936, False, "qwen3", head_dim=128),
}


def model_shape(name_or_path: str, config_overrides: Mapping[str, str] | None = None, role: str = "") -> ModelShape:
    """Shape of a model: an override for its role or name, a local directory, or KNOWN_CONFIGS."""
    overrides = config_overrides or {}
    for key in (role, name_or_path):
        if key and key in overrides:
            return ModelShape.from_config(name_or_path, json.loads(Path(overrides[key]).read_text(encoding="utf-8")))
    local = Path(name_or_path).expanduser() / "config.json"
    if local.is_file():
        return ModelShape.from_config(name_or_path, json.loads(local.read_text(encoding="utf-8")))
    if name_or_path in KNOWN_CONFIGS:
        return ModelShape.from_config(name_or_path, KNOWN_CONFIGS[name_or_path])
    raise ValueError(
        f"no config for model {name_or_path!r}: it is not a local directory with config.json and not one of "
        f"{', '.join(KNOWN_CONFIGS)}; pass --config {role or name_or_path}=path/to/config.json"
    )


# --------------------------------------------------------------------------- components


@dataclass
class GroupMemory:
    """One row of the table: a group's per-GPU memory by component, in bytes."""

    group: str
    gpus: int
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: float = 0.0
    overhead: float = OVERHEAD_GIB * GIB
    note: str = ""

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.kv_cache
            + self.overhead
        )


def training_state(
    shape: ModelShape, zero_stage: int, gpus: int, adam_offload: bool = False, lora_rank: int = 0
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for a trained model under DeepSpeed bf16."""
    total = shape.parameters
    trainable = shape.lora_parameters(lora_rank) if lora_rank else total
    frozen = total if lora_rank else 0
    shard_weights = gpus if zero_stage >= 3 else 1
    shard_grads = gpus if zero_stage >= 2 else 1
    shard_optimizer = gpus if zero_stage >= 1 else 1
    weights = 2 * (frozen + trainable) / shard_weights
    gradients = 2 * trainable / shard_grads
    optimizer = 0.0 if adam_offload else 12 * trainable / shard_optimizer
    return weights, gradients, optimizer


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    layer_working_set = tokens * (16 * shape.hidden_size + 6 * shape.intermediate_size)
    if checkpointing:
        return tokens * shape.hidden_size * 2 * shape.num_layers + layer_working_set
    return layer_working_set * shape.num_layers


def policy_logit_bytes(shape: ModelShape, tokens: int, chunk: int = OBJECTIVE_CHUNK) -> float:
    return tokens * shape.vocab_rows * 4 + 6 * min(chunk, tokens) * shape.vocab_rows * 4


def inference_bytes(shape: ModelShape, tokens: int) -> tuple[float, float]:
    """(working set, logits) of a forward pass without gradients over `tokens` tokens."""
    return tokens * (4 * shape.hidden_size + 2 * shape.intermediate_size) * 2, tokens * shape.vocab_rows * 6


def vllm_memory(
    shape: ModelShape, tensor_parallel: int, utilization: float, gpu_bytes: float, max_len: int
) -> GroupMemory:
    weights = 2 * shape.parameters / tensor_parallel
    budget = utilization * gpu_bytes
    kv = max(0.0, budget - weights - OVERHEAD_GIB * GIB)
    tokens = kv * tensor_parallel / shape.kv_bytes_per_token if shape.kv_bytes_per_token else 0
    return GroupMemory(
        "vLLM engine",
        0,
        weights=weights,
        kv_cache=kv,
        note=f"KV cache holds ~{tokens / 1e3:,.0f}k tokens (~{tokens / max_len:,.0f} sequences of {max_len})",
    )


# --------------------------------------------------------------------------- per recipe


@dataclass
class RecipeMemory:
    script: str
    gpu_memory_gb: float
    models: dict[str, ModelShape]
    rows: list[GroupMemory]
    phases: dict[str, float]  # phase name -> per-GPU peak (colocated recipes); else group totals
    notes: list[str]


def recipe_gpu_memory(script: os.PathLike) -> float:
    for line in Path(script).read_text(encoding="utf-8").splitlines():
        if line.startswith(GPU_MEMORY_MARKER):
            return float(line[len(GPU_MEMORY_MARKER) :].strip())
    return DEFAULT_GPU_MEMORY_GB


def estimate_recipe(
    parsed, gpu_memory_gb: float | None = None, config_overrides: Mapping[str, str] | None = None
) -> RecipeMemory:
    """Memory table of a parsed recipe (tsdkd_plugin.recipes_tools.recipe_check.ParsedRecipe)."""
    from tsdkd_plugin.recipes_tools.recipe_check import DPO_MODULE, PPO_MODULE, TSDKD_MODULE

    args, module = parsed.args, parsed.command.module
    gpu_gb = gpu_memory_gb or recipe_gpu_memory(parsed.command.script)
    gpu_bytes = gpu_gb * GIB
    rows: list[GroupMemory] = []
    notes: list[str] = []
    models: dict[str, ModelShape] = {}
    max_len = args.data.max_len

    if module == DPO_MODULE:
        student = models["student"] = model_shape(args.model.model_name_or_path, config_overrides, "student")
        gpus = parsed.command.deepspeed_gpus or 1
        w, g, o = training_state(student, args.ds.zero_stage, gpus, args.ds.adam_offload, args.ds.lora.rank)
        tokens = 2 * args.train.micro_batch_size * max_len  # chosen and rejected
        reference = 2 * student.parameters / (gpus if args.ds.zero_stage >= 3 else 1)
        rows.append(
            GroupMemory(
                "policy + reference (DPO)",
                gpus,
                weights=w + reference,
                gradients=g,
                optimizer=o,
                activations=activation_bytes(student, tokens, args.model.gradient_checkpointing_enable),
                logits=tokens * student.vocab_rows * 4,
                note="frozen reference weights included",
            )
        )
        return RecipeMemory(parsed.command.script, gpu_gb, models, rows, {"training": rows[0].total}, notes)

    student = models["student"] = model_shape(args.actor.model_name_or_path, config_overrides, "student")
    actor_gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
    w, g, o = training_state(student, args.ds.zero_stage, actor_gpus, args.ds.adam_offload, args.ds.lora.rank)
    train_tokens = args.train.micro_batch_size * max_len
    policy = GroupMemory(
        "policy (student)",
        actor_gpus,
        weights=w,
        gradients=g,
        optimizer=o,
        activations=activation_bytes(student, train_tokens, args.actor.gradient_checkpointing_enable),
        logits=policy_logit_bytes(student, train_tokens),
    )
    if args.ds.lora.rank:
        policy.note = (
            f"LoRA rank {args.ds.lora.rank}: {student.lora_parameters(args.ds.lora.rank) / 1e6:.0f}M trainable"
        )
    if args.ds.adam_offload:
        policy.note = (
            policy.note + "; " if policy.note else ""
        ) + f"Adam states on CPU: {12 * student.parameters / actor_gpus / GIB:.1f} GiB of host memory per GPU"
    rows.append(policy)

    colocated_teacher = None
    if module == TSDKD_MODULE:
        teacher = models["teacher"] = model_shape(args.teacher.model_name_or_path, config_overrides, "teacher")
        # The teacher is prepared with the policy's DeepSpeed stage: ZeRO-3 shards it over its group.
        zero3 = args.ds.zero_stage >= 3
        if args.teacher.placement == "colocate":
            colocated_teacher = GroupMemory(
                "teacher (inside each policy actor)",
                actor_gpus,
                weights=0.0 if args.teacher.offload else 2 * teacher.parameters / (actor_gpus if zero3 else 1),
                logits=train_tokens * teacher.vocab_rows * 2,
                overhead=0.0,
                note="dense logits kept for the loss" + ("; weights offloaded to CPU" if args.teacher.offload else ""),
            )
            rows.append(colocated_teacher)
        elif not args.teacher.remote_url:  # a served teacher's memory is its server's (docs/server_teacher.md)
            teacher_gpus = args.teacher.num_nodes * args.teacher.num_gpus_per_node
            working, logits = inference_bytes(teacher, args.rollout.micro_batch_size * max_len)
            rows.append(
                GroupMemory(
                    "teacher",
                    teacher_gpus,
                    weights=2 * teacher.parameters / (teacher_gpus if zero3 else 1),
                    activations=working,
                    logits=logits,
                    note=f"top-{args.teacher.sparse_top_k} transport",
                )
            )
    elif module == PPO_MODULE and args.algo.kl.init_coef > 0:
        ref_gpus = args.ref.num_nodes * args.ref.num_gpus_per_node
        working, logits = inference_bytes(student, args.rollout.micro_batch_size * max_len)
        rows.append(
            GroupMemory(
                "reference (start model)",
                ref_gpus,
                weights=2 * student.parameters / (ref_gpus if args.ds.zero_stage >= 3 else 1),
                activations=working,
                logits=logits,
                overhead=0.0 if args.train.colocate_all else OVERHEAD_GIB * GIB,
            )
        )

    vllm = vllm_memory(student, args.vllm.tensor_parallel_size, args.vllm.gpu_memory_utilization, gpu_bytes, max_len)
    vllm.gpus = (args.vllm.num_engines or 0) * args.vllm.tensor_parallel_size
    vllm.group = f"vLLM ({args.vllm.num_engines} engines x TP {args.vllm.tensor_parallel_size})"
    rows.append(vllm)

    if args.train.colocate_all:
        # Training: the policy and whatever shares its GPUs (reference, colocated teacher); vLLM sleeps
        # (weights offloaded, KV cache freed). Generation: vLLM at its utilization plus what stays resident.
        shared = [row for row in rows if row is not vllm]
        training = sum(row.total for row in shared)
        resident = colocated_teacher.weights if colocated_teacher else 0.0
        if not args.ds.enable_sleep:
            resident += policy.weights + policy.gradients + policy.optimizer
            notes.append("--ds.enable_sleep is off: the policy's states stay on the GPU while vLLM generates")
        if not args.vllm.enable_sleep:
            training += vllm.weights + vllm.kv_cache
            notes.append("--vllm.enable_sleep is off: vLLM keeps its memory while the policy trains")
        phases = {"training": training, "generation": args.vllm.gpu_memory_utilization * gpu_bytes + resident}
    else:
        phases = {row.group: row.total for row in rows}
    return RecipeMemory(parsed.command.script, gpu_gb, models, rows, phases, notes)


# --------------------------------------------------------------------------- output


def _gib(value: float) -> str:
    if value == 0:
        return "-"
    return "<0.1" if value < 0.05 * GIB else f"{value / GIB:.1f}"


def markdown(memory: RecipeMemory, repo_root: Path | None = None) -> str:
    script = Path(memory.script)
    if repo_root is not None:
        try:
            script = script.resolve().relative_to(repo_root.resolve())
        except ValueError:
            pass
    models = ", ".join(
        f"{role} {shape.name} ({shape.parameters / 1e9:.2f}B params, {shape.vocab_rows:,} logit rows)"
        for role, shape in memory.models.items()
    )
    lines = [
        f"### `{script}`",
        "",
        f"{models}; {memory.gpu_memory_gb:g} GB GPUs.",
        "",
        "| group | GPUs | weights | grads | optimizer | activations | logits | KV cache | overhead "
        "| total / GPU | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in memory.rows:
        lines.append(
            f"| {row.group} | {row.gpus} | {_gib(row.weights)} | {_gib(row.gradients)} | {_gib(row.optimizer)} | "
            f"{_gib(row.activations)} | {_gib(row.logits)} | {_gib(row.kv_cache)} | {_gib(row.overhead)} | "
            f"**{row.total / GIB:.1f}** | {row.note} |"
        )
    limit = memory.gpu_memory_gb * GIB
    verdicts = []
    for phase, peak in memory.phases.items():
        verdict = "fits" if peak <= limit else "DOES NOT FIT"
        verdicts.append(f"{phase} {peak / GIB:.1f} GiB ({verdict})")
    lines += ["", "Peak per GPU: " + "; ".join(verdicts) + "."]
    lines += [f"{note}." for note in memory.notes]
    return "\n".join(lines) + "\n"


def fits(memory: RecipeMemory) -> bool:
    return all(peak <= memory.gpu_memory_gb * GIB for peak in memory.phases.values())


DOC_HEADER = """# Memory per GPU of each recipe

Generated by `python -m tsdkd_plugin.recipes_tools.memory --write docs/memory.md` from the
recipes' own command lines (parsed with the real argument parsers) and the models' configs; the
test suite fails when this file is out of date. All sizes in GiB per GPU. How each column is
estimated, and what it leaves out, is in the module's docstring
(`tsdkd_plugin/recipes_tools/memory.py`); these are planning numbers from first principles, not
yet compared with measured peaks on GPUs: leave headroom.

Why the layouts look as they do:
- The students (1.5-2.6B) train comfortably under ZeRO-2 on 4 GPUs: the fp32 Adam states
  (12 bytes per parameter), the largest part of the training state, are sharded over the group.
- Logits dominate activations: a micro-batch of 4 x 2048 tokens over 152k (Qwen) or 256k
  (Gemma) vocabulary rows costs several GiB, which is why Gemma and Qwen3-thinking recipes use
  smaller micro-batches (same effective batch of 128 through accumulation).
- A separate teacher replica needs its bf16 weights on one GPU (14B: 27.5 GiB) plus one
  forward; with a colocated teacher ZeRO-3 shards it over the policy's GPUs.
- vLLM takes what its gpu_memory_utilization allows; the KV column says how many tokens of
  rollouts fit at once.

"""


def build_doc(memories: Sequence[RecipeMemory], repo_root: Path) -> str:
    return DOC_HEADER + "\n".join(markdown(memory, repo_root) for memory in memories)


def main(argv: list[str] | None = None) -> int:
    from tsdkd_plugin.recipes_tools.recipe_check import (
        EXAMPLE_ENV,
        REPO_ROOT,
        RecipeError,
        parse_recipe,
        recipe_scripts,
    )

    parser = argparse.ArgumentParser(
        prog="python -m tsdkd_plugin.recipes_tools.memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scripts", nargs="*", help="recipe scripts (default: every recipe under recipes/)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="ROLE_OR_MODEL=CONFIG_JSON",
        help="config.json for a role (student, teacher) or a model name; repeatable",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help=f"GPU memory (default: the recipe's '{GPU_MEMORY_MARKER}' line, else {DEFAULT_GPU_MEMORY_GB})",
    )
    parser.add_argument(
        "--write", default=None, help="write the full document (e.g. docs/memory.md) instead of printing"
    )
    options = parser.parse_args(argv)

    overrides = {}
    for item in options.config:
        key, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(
                "memory: error: --config expects ROLE_OR_MODEL=path/to/config.json with an existing file, "
                f"got {item!r}",
                file=sys.stderr,
            )
            return 2
        overrides[key] = path
    env = {key: os.environ.get(key, value) for key, value in EXAMPLE_ENV.items()}
    memories = []
    for script in [Path(s) for s in options.scripts] or recipe_scripts():
        try:
            memories.append(estimate_recipe(parse_recipe(script, env), options.gpu_memory_gb, overrides))
        except (RecipeError, ValueError) as error:
            print(f"memory: error: {script}: {error}", file=sys.stderr)
            return 2
    if options.write:
        Path(options.write).write_text(build_doc(memories, REPO_ROOT), encoding="utf-8")
        print(f"wrote {options.write}", file=sys.stderr)
    else:
        print("\n".join(markdown(memory, REPO_ROOT) for memory in memories), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
