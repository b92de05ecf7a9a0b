"""`python -m openrlhf.cli.train_tsdkd`: TSD-KD on OpenRLHF's Ray + vLLM + DeepSpeed stack.

Thin on purpose (as upstream's cli/train_*.py): parse, validate, wire.
Arguments: all of upstream `train_ppo_ray`'s (reused from the installed OpenRLHF,
see tsdkd_plugin/host/upstream_cli.py) plus `--teacher.*` and `--tsdkd.*`, which become
the typed run configuration here (host/run_config.py) and travel as it is to every Ray actor.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the host modules are imported when used (they load torch)
    from tsdkd_plugin.host.run_config import RunConfig

PROG = "python -m openrlhf.cli.train_tsdkd"
DESCRIPTION = (
    "Token-Selective Dual Knowledge Distillation (TSD-KD): the student samples n candidates per prompt with "
    "vLLM; a teacher group re-ranks them and supplies the signals for the entropy-gap-gated JSD, "
    "teacher-ranked ListMLE and entropy terms. Upstream train_ppo_ray flags apply as documented by OpenRLHF."
)


def build_parser():
    """Upstream train_ppo_ray's parser (reused, not copied) plus the TSD-KD groups."""
    from tsdkd_plugin.host.args import add_tsdkd_arguments
    from tsdkd_plugin.host.upstream_cli import load_upstream_cli

    upstream = load_upstream_cli()
    parser = upstream.build_parser()
    parser.prog, parser.description = PROG, DESCRIPTION
    add_tsdkd_arguments(parser)
    return parser, upstream


def parse_args(argv: list[str] | None = None) -> tuple[SimpleNamespace, RunConfig]:
    """Parse and run every check that needs no file, model or cluster: ours first (on the flags as
    typed: upstream's post-parse code divides by some of them), then upstream's own validations.
    Returns (upstream's hierarchical args, the typed run configuration). Used by the recipe checks,
    which must not touch the hub."""
    from openrlhf.utils.config import hierarchize

    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight.options import check_options, normalize_options

    parser, upstream = build_parser()
    flat_args = parser.parse_args(argv)
    defaults = {action.dest: parser.get_default(action.dest) for action in parser._actions if action.option_strings}
    try:
        run = check_options(hierarchize(flat_args), defaults)
        args = normalize_options(upstream.finalize(flat_args))
    except ArgumentError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    except AssertionError as error:  # upstream's own validations are asserts
        parser.exit(2, f"{PROG}: error: invalid arguments (OpenRLHF): {error}\n")
    return args, run


def preflight(args: SimpleNamespace, run: RunConfig):
    """Checks that read files, models and data (still before any Ray worker): one call that returns
    the resolved plan (host/preflight). Exits with status 2 and one sentence on bad input."""
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight import preflight as check_launch

    try:
        return check_launch(args, run)
    except ArgumentError as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        sys.exit(2)


def init_ray(args: SimpleNamespace) -> None:
    import ray

    from tsdkd_plugin.host.device import apply_cpu_mode_env, cpu_mode, init_local_ray_cluster
    from tsdkd_plugin.host.preflight.plan import required_gpus

    if cpu_mode():
        # The vLLM engines are created in this process; in CPU mode their dtype follows the actor's.
        apply_cpu_mode_env(param_dtype=args.ds.param_dtype)
    if ray.is_initialized():
        return
    if cpu_mode() and not os.environ.get("RAY_ADDRESS"):
        init_local_ray_cluster(num_gpus=required_gpus(args)["total"], param_dtype=args.ds.param_dtype)
        return
    ray.init(
        runtime_env={
            "env_vars": {
                "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
                "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
            }
        }
    )


def main(argv: list[str] | None = None) -> None:
    args, run = parse_args(argv)
    plan = preflight(args, run)
    if args.tsdkd.dry_run:
        print(json.dumps(plan.as_dict(), indent=2, default=str))
        return

    import ray

    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight import check_cluster_capacity

    init_ray(args)
    try:
        check_cluster_capacity(args, ray.cluster_resources().get("GPU", 0))
    except ArgumentError as error:
        sys.exit(f"{PROG}: error: {error}")
    from tsdkd_plugin.host.faults import stop_reason, worker_failure_report
    from tsdkd_plugin.host.launch import train

    try:
        train(args, run, plan.shared_vocab_size)
    except Exception as error:
        # A stopped run (teacher unavailable, repeated non-finite losses) ends with its one-sentence
        # reason; a worker that failed on an input (a model vLLM cannot load after all, a checkpoint
        # DeepSpeed cannot read) with one sentence naming the flag and file, and the worker's last
        # error line beneath it: not Ray's nested cross-process tracebacks (docs/reliability.md).
        stopped = stop_reason(error)
        failure = None if stopped is not None else worker_failure_report(error, args)
        if stopped is None and failure is None:
            raise
        if failure is not None and failure.input_flag is None:
            sys.stderr.write(f"{error}\n")  # not caused by one input: keep the whole trace for debugging
        ray.shutdown()  # flush the workers' forwarded logs first, so the reason is the last line
        sys.exit(f"{PROG}: error: {stopped if stopped is not None else failure.message}")


if __name__ == "__main__":
    main()
