"""Checks that run before any Ray worker starts, so a wrong launch fails in seconds.

Every failure is an `ArgumentError` whose message is one sentence naming the option or file
and what would be valid; the CLI prints it without a traceback and exits 2 (docs/reliability.md).

Two entry points:
- `options.check_options(args, defaults)`: the flags alone, at parse time (the recipe checks
  parse launch scripts and must not touch models, data or the hub); it builds and returns the typed
  run configuration (host/run_config.py);
- `preflight(args, run)`: everything else, in one call that returns the resolved `LaunchPlan`.

The parts, one module each:
  options  flags alone: ranges, combinations, upstream options TSD-KD does not use
  paths    output/checkpoint/log directories writable, reward and agent scripts, the checkpoint to resume
  models   model directories (config, weights, tokenizer) and the ranges that depend on the models
  data     prompt and evaluation datasets, row by row
  plan     GPUs per group, the cluster check, the resolved plan
"""

from __future__ import annotations

from types import SimpleNamespace

from tsdkd_plugin.host.preflight.data import check_datasets
from tsdkd_plugin.host.preflight.models import check_models
from tsdkd_plugin.host.preflight.options import check_options, require_option
from tsdkd_plugin.host.preflight.paths import check_output_paths, check_resume_checkpoint, check_scripts
from tsdkd_plugin.host.preflight.plan import LaunchPlan, check_cluster_capacity, required_gpus, resolved_plan
from tsdkd_plugin.host.run_config import RunConfig

__all__ = ["LaunchPlan", "check_cluster_capacity", "check_options", "preflight", "require_option", "required_gpus",
           "resolved_plan"]


def preflight(args: SimpleNamespace, run: RunConfig) -> LaunchPlan:
    """Everything a launch reads or writes, cheapest first; the plan of what will start."""
    check_output_paths(args)
    check_scripts(args)
    models = check_models(args, run.objective)
    prompts = check_datasets(args, models.student.tokenizer)
    check_resume_checkpoint(args, models.student.weights)
    return LaunchPlan(models.shared_vocab_size, prompts, resolved_plan(args, run, models, prompts))
