"""Check launch recipes against the real argument parsers, and print what they would launch.

A recipe is a bash script under recipes/ that ends in `launch_ray_job MODULE ARGS...` or
`launch_deepspeed GPUS MODULE ARGS...` (recipes/lib/common.sh). Run with
TSDKD_RECIPE_PRINT_ARGS=1 it prints its launcher, module and argv (NUL-separated) and exits
without contacting anything; this module reads that argv and parses it with

- TSD-KD:              tsdkd_plugin.cli.train_tsdkd.parse_args (upstream train_ppo_ray's parser
                       plus --teacher.* / --tsdkd.*, and every check that needs no file or model);
- GRPO (train_ppo_ray) and DPO (train_dpo): upstream's own parser and post-parse validation,
                       loaded from the installed OpenRLHF source by tsdkd_plugin.host.upstream_cli.

So a stale, misspelled or invalid flag fails here exactly as it would at launch, minus the
cluster. The resolved plan (groups, GPUs per group, nodes) is what `TSDKD_RECIPE_DRY_RUN=1`
prints.

    python -m tsdkd_plugin.recipes_tools.recipe_check                 # every recipe, one line each
    python -m tsdkd_plugin.recipes_tools.recipe_check --plan recipes/tsdkd/qwen2.5-14b_to_1.5b.1node.sh
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"

TSDKD_MODULE = "openrlhf.cli.train_tsdkd"
PPO_MODULE = "openrlhf.cli.train_ppo_ray"
DPO_MODULE = "openrlhf.cli.train_dpo"
ENTRY_POINTS = (TSDKD_MODULE, PPO_MODULE, DPO_MODULE)
LAUNCHERS = ("ray-job", "deepspeed")

# Placeholders for the variables that multi-node recipes require (nothing is contacted when a
# recipe only prints its argv, so these never need to resolve).
EXAMPLE_ENV = {"RAY_HEAD_ADDRESS": "ray-head.example", "SHARED_DIR": "/shared/tsdkd"}

# The reference training setup (docs: /shared notes method.md, docs/recipes.md): what every TSD-KD
# recipe must keep unless its header says why not. (dotted attribute, expected, comparison)
TSDKD_REFERENCE_SETUP = (
    ("actor.adam.lr", 5e-6, "=="),
    ("actor.lr_scheduler", "cosine", "=="),
    ("actor.lr_warmup_ratio", 0.1, "=="),
    ("train.batch_size", 128, "=="),
    ("train.num_episodes", 3, "=="),
    ("ds.param_dtype", "bf16", "=="),
    ("rollout.temperature", 1.0, "=="),
    ("rollout.max_new_tokens", 1024, ">="),
)


class RecipeError(ValueError):
    """A recipe cannot be read or its command line is rejected; the message names the recipe."""


@dataclass(frozen=True)
class RecipeCommand:
    script: str
    launcher: str  # "ray-job" or "deepspeed"
    module: str  # e.g. openrlhf.cli.train_tsdkd
    argv: Tuple[str, ...]
    deepspeed_gpus: Optional[int] = None  # processes per node a deepspeed launch starts

    def flag_value(self, flag: str) -> Optional[str]:
        """The token after `flag` in argv (None when absent); for quick looks, not for parsing."""
        argv = list(self.argv)
        return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


@dataclass
class ParsedRecipe:
    command: RecipeCommand
    args: SimpleNamespace  # hierarchical, as the entry point's own code sees it
    config: object = None  # the typed RunConfig (host/run_config.py) for TSD-KD recipes
    notes: str = ""  # what upstream printed while validating (its warnings)


def recipe_scripts(root: Path = RECIPES_DIR) -> List[Path]:
    """Every launch recipe under root: bash scripts that call launch_ray_job / launch_deepspeed."""
    scripts = []
    for path in sorted(root.rglob("*.sh")):
        text = path.read_text(encoding="utf-8")
        if any(line.lstrip().startswith(("launch_ray_job ", "launch_deepspeed ")) for line in text.splitlines()):
            scripts.append(path)
    return scripts


def recipe_command(script: os.PathLike, env: Optional[Mapping[str, str]] = None, timeout: float = 30) -> RecipeCommand:
    """Run the recipe in print-args mode and return its launcher, module and argv."""
    script = Path(script)
    run_env = dict(os.environ)
    run_env.pop("TSDKD_RECIPE_DRY_RUN", None)
    run_env.update(env or {})
    run_env["TSDKD_RECIPE_PRINT_ARGS"] = "1"
    result = subprocess.run(["bash", str(script)], env=run_env, capture_output=True, timeout=timeout)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        raise RecipeError(f"{script}: could not print its command line: {message}")
    tokens = result.stdout.decode().split("\0")
    if tokens and tokens[-1] == "":
        tokens.pop()
    # "ray-job" or "deepspeed:<gpus per node>", then the module, then its argv.
    launcher, _, gpus = tokens[0].partition(":") if tokens else ("", "", "")
    if len(tokens) < 2 or launcher not in LAUNCHERS:
        raise RecipeError(f"{script}: print-args mode did not print 'launcher\\0module\\0args...' (got {tokens[:3]!r})")
    module, argv = tokens[1], tuple(tokens[2:])
    if module not in ENTRY_POINTS:
        raise RecipeError(f"{script}: launches {module!r}, which is none of {', '.join(ENTRY_POINTS)}")
    return RecipeCommand(str(script), launcher, module, argv, int(gpus) if gpus else None)


@functools.lru_cache(maxsize=None)
def _upstream_cli(module: str):
    from tsdkd_plugin.host.upstream_cli import load_upstream_cli

    return load_upstream_cli(module)


@contextlib.contextmanager
def _captured_streams():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def parse_command(module: str, argv: Sequence[str], where: str = "") -> Tuple[SimpleNamespace, object, str]:
    """(hierarchical args, TSD-KD run configuration or None, upstream's printed warnings) or RecipeError."""
    label = f"{where}: " if where else ""
    with _captured_streams() as (out, err):
        try:
            if module == TSDKD_MODULE:
                from tsdkd_plugin.cli.train_tsdkd import parse_args

                args, config = parse_args(list(argv))
            elif module in (PPO_MODULE, DPO_MODULE):
                cli = _upstream_cli(module)
                args, config = cli.finalize(cli.build_parser().parse_args(list(argv))), None
            else:
                raise RecipeError(f"{label}unknown entry point {module!r}; expected one of {', '.join(ENTRY_POINTS)}")
        except SystemExit as exit_:
            message = err.getvalue().strip().splitlines()
            detail = message[-1] if message else f"exit status {exit_.code}"
            raise RecipeError(f"{label}{module} rejects the command line: {detail}") from None
        except AssertionError as error:  # upstream validates with asserts
            raise RecipeError(f"{label}{module} rejects the arguments: {error}") from None
    return args, config, out.getvalue()


def parse_recipe(script: os.PathLike, env: Optional[Mapping[str, str]] = None) -> ParsedRecipe:
    command = recipe_command(script, env)
    args, config, notes = parse_command(command.module, command.argv, where=command.script)
    return ParsedRecipe(command, args, config, notes)


def _group(nodes: int, gpus_per_node: int, **extra) -> Dict:
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": nodes * gpus_per_node, **extra}


def ppo_plan(args: SimpleNamespace) -> Dict:
    """What upstream train_ppo_ray.train would place, group by group (mirrors its rules)."""
    colocate_all = bool(args.train.colocate_all)
    groups = {
        "actor": _group(args.actor.num_nodes, args.actor.num_gpus_per_node, model=args.actor.model_name_or_path,
                        zero_stage=args.ds.zero_stage),
        "vllm": {"engines": args.vllm.num_engines or 0, "tensor_parallel_size": args.vllm.tensor_parallel_size,
                 "gpus": (args.vllm.num_engines or 0) * args.vllm.tensor_parallel_size},
    }
    if args.algo.kl.init_coef > 0:  # upstream creates a reference group only then
        groups["ref"] = _group(args.ref.num_nodes, args.ref.num_gpus_per_node, model=args.actor.model_name_or_path)
    if args.critic.model_name_or_path:
        groups["critic"] = _group(args.critic.num_nodes, args.critic.num_gpus_per_node)
    if not args.reward.remote_url:
        groups["reward_model"] = _group(args.reward.num_nodes, args.reward.num_gpus_per_node,
                                        model=args.reward.model_name_or_path)
    else:
        groups["reward"] = {"remote": list(args.reward.remote_url), "gpus": 0}

    if colocate_all:  # every group shares the actor's placement group (fractional GPUs)
        total = max(groups["actor"]["gpus"], groups["vllm"]["gpus"])
    else:
        total = groups["vllm"]["gpus"] + groups["actor"]["gpus"]
        if "ref" in groups and not args.train.colocate_actor_ref:
            total += groups["ref"]["gpus"]
        critic_reward = [groups[name]["gpus"] for name in ("critic", "reward_model") if name in groups]
        total += max(critic_reward) if args.train.colocate_critic_reward and critic_reward else sum(critic_reward)
    return {
        "entry_point": PPO_MODULE,
        "estimator": args.algo.advantage.estimator,
        "colocate_all": colocate_all,
        "groups": groups,
        "gpus": {"total": total},
        "rollout": {"n_samples_per_prompt": args.rollout.n_samples_per_prompt, "batch_size": args.rollout.batch_size,
                    "max_new_tokens": args.rollout.max_new_tokens, "temperature": args.rollout.temperature},
    }


def dpo_plan(args: SimpleNamespace, deepspeed_gpus: Optional[int]) -> Dict:
    return {
        "entry_point": DPO_MODULE,
        "launcher": "deepspeed",
        "groups": {"policy_and_reference": {"processes": deepspeed_gpus, "model": args.model.model_name_or_path,
                                            "reference": args.ref.model_name_or_path, "zero_stage": args.ds.zero_stage,
                                            "lora_rank": args.ds.lora.rank}},
        "gpus": {"total": deepspeed_gpus},
        "data": {"dataset": args.data.dataset, "max_len": args.data.max_len},
    }


def resolved_plan(module: str, args: SimpleNamespace, config=None, deepspeed_gpus: Optional[int] = None) -> Dict:
    """The plan printed by a recipe's dry run; TSD-KD's comes from the CLI's own resolved_plan."""
    if module == TSDKD_MODULE:
        from tsdkd_plugin.host.preflight import resolved_plan as tsdkd_resolved_plan

        plan = tsdkd_resolved_plan(args, config, None)  # vocabulary size needs the tokenizers: not read here
        return {"entry_point": TSDKD_MODULE, **plan}
    if module == PPO_MODULE:
        return ppo_plan(args)
    if module == DPO_MODULE:
        return dpo_plan(args, deepspeed_gpus)
    raise RecipeError(f"unknown entry point {module!r}")


def _dotted(namespace: SimpleNamespace, dotted: str):
    value = namespace
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


DEVIATION_MARKER = "# reference-setup-deviation:"


def declared_deviations(script: os.PathLike) -> Dict[str, str]:
    """Departures a recipe declares in its header, as `# reference-setup-deviation: attr (why)`."""
    declared = {}
    for line in Path(script).read_text(encoding="utf-8").splitlines():
        if line.startswith(DEVIATION_MARKER):
            attribute, _, why = line[len(DEVIATION_MARKER):].strip().partition(" ")
            declared[attribute] = why.strip()
    return declared


def reference_setup_deviations(parsed: ParsedRecipe) -> List[str]:
    """Where a TSD-KD recipe departs from the reference setup without declaring it (empty: none)."""
    if parsed.command.module != TSDKD_MODULE:
        return []
    declared = declared_deviations(parsed.command.script)
    deviations = []
    for dotted, expected, comparison in TSDKD_REFERENCE_SETUP:
        if dotted in declared:
            continue
        value = _dotted(parsed.args, dotted)
        ok = value is not None and (value >= expected if comparison == ">=" else value == expected)
        if not ok:
            deviations.append(f"--{dotted} is {value!r}, the reference setup has {comparison} {expected!r}")
    return deviations


def _summary(plan: Dict) -> str:
    groups = plan.get("groups")
    if groups is None:  # TSD-KD plan: actor / vllm / teacher counts under "gpus"
        return ", ".join(f"{name} {count}" for name, count in plan.get("gpus", {}).items())
    parts = [f"{name} {group.get('gpus', group.get('processes'))}" for name, group in groups.items()]
    return ", ".join(parts) + f", total {plan['gpus']['total']}"


def _split_at_double_dash(argv: List[str]) -> Tuple[List[str], List[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    own_argv, command_argv = _split_at_double_dash(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="python -m tsdkd_plugin.recipes_tools.recipe_check",
        description="Parse launch recipes with the real argument parsers; --plan prints what they would launch.",
    )
    parser.add_argument("scripts", nargs="*", help="recipe scripts (default: every recipe under recipes/)")
    parser.add_argument("--plan", action="store_true", help="print the resolved plan of each recipe as JSON")
    parser.add_argument("--module", choices=ENTRY_POINTS,
                        help="check one command line given after `--` instead of scripts (the recipes' dry run)")
    parser.add_argument("--deepspeed-gpus", type=int, default=None, help="processes a deepspeed launch starts")
    parser.add_argument("--example-env", action="store_true",
                        help=f"fill variables that multi-node recipes require with placeholders ({', '.join(EXAMPLE_ENV)})")
    options = parser.parse_args(own_argv)

    if options.module:
        try:
            args, config, _ = parse_command(options.module, command_argv)
            plan = resolved_plan(options.module, args, config, options.deepspeed_gpus)
        except RecipeError as error:
            print(f"recipe_check: error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(plan, indent=2, default=str))
        return 0

    env = {key: os.environ.get(key, value) for key, value in EXAMPLE_ENV.items()} if options.example_env else {}
    scripts = [Path(s) for s in options.scripts] or recipe_scripts()
    failures = 0
    for script in scripts:
        try:
            parsed = parse_recipe(script, env)
            plan = resolved_plan(parsed.command.module, parsed.args, parsed.config, parsed.command.deepspeed_gpus)
        except RecipeError as error:
            failures += 1
            print(f"FAIL {script}: {error}")
            continue
        deviations = reference_setup_deviations(parsed)
        status = "OK  " if not deviations else "WARN"
        print(f"{status} {script} ({parsed.command.module}; GPUs: {_summary(plan)})")
        for deviation in deviations:
            print(f"     {deviation}")
        if options.plan:
            print(json.dumps(plan, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
