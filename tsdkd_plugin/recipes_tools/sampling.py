"""Responses of a model to a prompt file with vLLM, sharded over the GPUs of one node.

    # the teacher's greedy answers (labels for GRPO where the data has no ground truth)
    python -m tsdkd_plugin.recipes_tools.sampling --model Qwen/Qwen2.5-14B-Instruct \\
        --prompts data/tsdkd_prompts.jsonl --num-samples 1 --temperature 0 --out gen/teacher.jsonl --gpus 8

Reads a TSD-KD prompt file (prepare_data prompts: chat messages under `prompt`), renders each
prompt as OpenRLHF does with --data.apply_chat_template, and writes one row per prompt:

    {"index": i, "prompt": [messages], "prompt_token_ids": [...], "responses": [...], "response_token_ids": [[...]]}

(a generation file for `prepare_data prompts --teacher-answers` and `prepare_data dpo-pairs`).
Sampling uses one seed per prompt (--seed + its index), so the output does not depend on the
sharding. The prompts are split into --gpus / --gpus-per-process shards, each sampled by its own
vLLM engine in a child process that sees only its GPUs (CUDA_VISIBLE_DEVICES); shard files are
written under a temporary name and renamed when complete, and a rerun skips the shards that exist
(WORK_DIR, default OUT.shards/: delete it when the model, prompts or settings change). A failed
shard stops the run with one line naming its log file. `dpo_pairs` uses the same machinery.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tsdkd_plugin.recipes_tools.prepare_data import DataError, load_rows, write_jsonl

PROG = "python -m tsdkd_plugin.recipes_tools.sampling"


def read_prompts(path: str, input_key: str = "prompt", max_prompts: int | None = None) -> list[dict]:
    """{"index", "prompt"} rows of a TSD-KD prompt file (chat messages under input_key)."""
    if not Path(path).is_file():
        raise DataError(f"--prompts {path!r} does not exist")
    rows = []
    for row in load_rows(path):
        messages = row.get(input_key)
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{path}: row {len(rows) + 1} has no chat-message list under {input_key!r} "
                f"(--input-key); write the file with `prepare_data prompts`"
            )
        rows.append({"index": len(rows), "prompt": messages})
        if max_prompts is not None and len(rows) >= max_prompts:
            break
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def prompt_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt as OpenRLHF renders it with --data.apply_chat_template (then tokenized without
    adding special tokens again)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def add_sampling_arguments(parser: argparse.ArgumentParser, num_samples: int, temperature: float) -> None:
    parser.add_argument("--prompts", required=True, help="TSD-KD prompt file (prepare_data prompts)")
    parser.add_argument("--input-key", default="prompt", help="chat-message column of --prompts (default: prompt)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts only")
    parser.add_argument(
        "--num-samples", type=int, default=num_samples, help=f"responses per prompt (default {num_samples})"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"sampling temperature, 0 for greedy (default {temperature})",
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response (default 1024)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of this node to use (default 1)")
    parser.add_argument(
        "--gpus-per-process",
        type=int,
        default=1,
        help="GPUs per shard: the vLLM engine's tensor parallel size (default 1)",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype (default bf16)")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM memory fraction")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    parser.add_argument("--seed", type=int, default=42)
    # Internal: one shard of one phase, in a child process.
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-shards", type=int, default=1, help=argparse.SUPPRESS)


def check_sampling_options(options) -> None:
    if options.num_samples < 1:
        raise DataError(f"--num-samples must be at least 1, got {options.num_samples}")
    if options.gpus < 1 or options.gpus_per_process < 1 or options.gpus % options.gpus_per_process:
        raise DataError(
            f"--gpus ({options.gpus}) must be a positive multiple of --gpus-per-process ({options.gpus_per_process})"
        )


def check_model_dir(option: str, value: str) -> None:
    if value.startswith(("/", "./", "../", "~")) and not (Path(value).expanduser() / "config.json").is_file():
        raise DataError(f"{option} {value!r} is not a model directory (no config.json)")


def shard_rows(rows: Sequence[dict], shard: int, num_shards: int) -> list[dict]:
    return [row for index, row in enumerate(rows) if index % num_shards == shard]


def sample_rows(model: str, rows: list[dict], options) -> list[dict]:
    """The rows with each prompt's responses, from one vLLM engine in this process."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [prompt_token_ids(tokenizer, row["prompt"]) for row in rows]
    engine_args = dict(
        model=model,
        tensor_parallel_size=options.gpus_per_process,
        dtype={"bf16": "bfloat16", "fp32": "float32"}[options.dtype],
        seed=options.seed,
        enforce_eager=options.enforce_eager,
        gpu_memory_utilization=options.gpu_memory_utilization,
    )
    if options.max_model_len:
        engine_args["max_model_len"] = options.max_model_len
    if current_platform.is_cpu():
        # vLLM-CPU cannot rewind a seeded request's generator after a partial prefill ("CPU Generator
        # does not use offset"): unchunked, a prompt waits for the next engine step instead of being split.
        engine_args["enable_chunked_prefill"] = False
    llm = LLM(**engine_args)
    # One seed per prompt: unlike one seed for every request, not the same random stream for
    # every prompt; and the same samples whatever the sharding.
    params = [
        SamplingParams(
            n=options.num_samples,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_new_tokens,
            seed=options.seed + row["index"],
        )
        for row in rows
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    return [
        {
            "index": row["index"],
            "prompt": row["prompt"],
            "prompt_token_ids": ids,
            "responses": [completion.text for completion in output.outputs],
            "response_token_ids": [list(completion.token_ids) for completion in output.outputs],
        }
        for row, ids, output in zip(rows, prompts, outputs, strict=True)
    ]


def child_env(shard: int, gpus_per_process: int) -> dict[str, str]:
    """A shard's environment: its own GPUs, or the CPU-mode variables (vLLM-CPU) without CUDA."""
    from tsdkd_plugin.host.device import cpu_mode, cpu_mode_env

    env = dict(os.environ)
    if cpu_mode():
        env.update(cpu_mode_env())
    else:
        first = shard * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
    return env


def run_shards(
    module: str,
    argv: Sequence[str],
    phase: str,
    num_shards: int,
    gpus_per_process: int,
    output_of: Callable[[int], Path],
    log_dir: Path,
) -> None:
    """Run `python -m module ARGV --phase PHASE --shard i --num-shards N` for every shard whose
    output does not exist yet, all at once (one GPU group each); a DataError names a failed shard."""
    running = []
    for shard in range(num_shards):
        if output_of(shard).is_file():
            continue
        log = log_dir / f"{phase}.{shard}.log"
        command = [
            sys.executable,
            "-m",
            module,
            *argv,
            "--phase",
            phase,
            "--shard",
            str(shard),
            "--num-shards",
            str(num_shards),
        ]
        handle = open(log, "w")
        process = subprocess.Popen(
            command, env=child_env(shard, gpus_per_process), stdout=handle, stderr=subprocess.STDOUT
        )
        running.append((shard, log, handle, process))
    failed = []
    for shard, log, handle, process in running:
        code = process.wait()
        handle.close()
        if code != 0:
            failed.append((shard, code, log))
    if failed:
        shard, code, log = failed[0]
        raise DataError(
            f"the {phase} phase failed for {len(failed)} of {num_shards} shard(s) (shard {shard}: exit "
            f"status {code}); see {log}; rerun the same command to retry only the failed shards"
        )


def merged_shards(num_shards: int, output_of: Callable[[int], Path]) -> list[dict]:
    """Every shard's rows, back in prompt-file order."""
    rows = [row for shard in range(num_shards) for row in load_rows(str(output_of(shard)))]
    return sorted(rows, key=lambda row: row["index"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model name or directory")
    parser.add_argument("--out", required=True, help="generation file (JSONL)")
    parser.add_argument("--work-dir", default=None, help="shard files and logs (default: OUT.shards)")
    add_sampling_arguments(parser, num_samples=1, temperature=0.0)
    options = parser.parse_args(argv)
    work_dir = Path(options.work_dir or f"{options.out}.shards")

    def output_of(shard: int) -> Path:
        return work_dir / f"samples.{shard}.jsonl"

    try:
        check_sampling_options(options)
        check_model_dir("--model", options.model)
        rows = read_prompts(options.prompts, options.input_key, options.max_prompts)
        if options.phase == "sample":
            write_jsonl(
                sample_rows(options.model, shard_rows(rows, options.shard, options.num_shards), options),
                str(output_of(options.shard)),
            )
            return 0
        work_dir.mkdir(parents=True, exist_ok=True)
        num_shards = min(options.gpus // options.gpus_per_process, len(rows))
        run_shards(
            "tsdkd_plugin.recipes_tools.sampling",
            argv,
            "sample",
            num_shards,
            options.gpus_per_process,
            output_of,
            work_dir,
        )
        written = write_jsonl(merged_shards(num_shards, output_of), options.out)
    except DataError as error:
        print(f"sampling: error: {error}", file=sys.stderr)
        return 2
    print(f"sampling: wrote {written} prompts x {options.num_samples} response(s) to {options.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
