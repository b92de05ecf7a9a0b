"""Where the run writes and what it reads besides models and data: output, checkpoint and log
directories, the checkpoint to resume from, reward and agent scripts.

Directories are probed, not created: a probe file is made and removed in the directory, or in
its nearest existing parent when the run would create it, so a launch that is refused leaves
nothing behind. (On a multi-node cluster the probe runs on the driver's node; like upstream,
--ckpt.path must be one filesystem shared by all nodes.)
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.host.checkpoint import actor_checkpoint_dir, checkpoint_problem, read_latest
from tsdkd_plugin.host.preflight.options import data_parallel_ranks

PROBE_PREFIX = ".tsdkd-write-probe-"


def check_writable_directory(option: str, path: str) -> None:
    """`path` is a directory this process can write, or can be created as one."""
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ArgumentError(f"{option} {path!r} is a file, not a directory; point it elsewhere")
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ArgumentError(f"{option} {path!r} cannot be created: {existing} is a file; point it elsewhere")
    try:
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ArgumentError(
            f"{option} {path!r} is not writable ({existing}: {error.strerror}); choose a directory this user can "
            f"write, on a filesystem every node shares"
        ) from None


def check_output_paths(args: SimpleNamespace) -> None:
    """Everything the run writes, probed now rather than at the first save or at the very end."""
    saving = args.ckpt.save_steps != -1 and args.ckpt.save_steps != float("inf")
    if saving or args.ckpt.load_enable:
        if os.path.exists(args.ckpt.path) and not os.path.isdir(args.ckpt.path):
            raise ArgumentError(
                f"--ckpt.path {args.ckpt.path!r} is a file, not a checkpoint directory; point it elsewhere"
            )
    if saving:
        check_writable_directory("--ckpt.path", args.ckpt.path)
    check_writable_directory("--ckpt.output_dir", args.ckpt.output_dir)  # the final model is saved there
    if args.logger.tensorboard_dir:
        check_writable_directory("--logger.tensorboard_dir", args.logger.tensorboard_dir)


def _defines(path: str, name: str) -> Tuple[bool, Optional[str]]:
    """(does the Python file define `name` at top level, a syntax problem or None)."""
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
    except SyntaxError as error:
        return False, f"has a syntax error (line {error.lineno}: {error.msg})"
    except (OSError, UnicodeDecodeError) as error:
        return False, f"cannot be read ({getattr(error, 'strerror', None) or error})"
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return name in names, None


def _check_script(option: str, path: str, name: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ArgumentError(f"{option} {path!r} does not exist; point it at a Python file that defines {what}")
    defined, problem = _defines(path, name)
    if problem:
        raise ArgumentError(f"{option} {path!r} {problem}; fix the file")
    if not defined:
        raise ArgumentError(f"{option} {path!r} does not define {what}; add it (see OpenRLHF's examples)")


def check_scripts(args: SimpleNamespace) -> None:
    """Reward and agent scripts, which the vLLM engines import at start-up."""
    if args.train.agent_func_path:
        path = args.train.agent_func_path
        if not path.endswith(".py"):
            raise ArgumentError(f"--train.agent_func_path {path!r} must be a Python file (.py) defining AgentExecutor")
        _check_script("--train.agent_func_path", path, "AgentExecutor", "class AgentExecutor(AgentExecutorBase)")
        return
    urls = args.reward.remote_url or []
    urls = urls.split(",") if isinstance(urls, str) else urls
    for position, url in enumerate(urls):
        if position == 0 and url.endswith(".py"):
            _check_script("--reward.remote_url", url, "reward_func", "reward_func(queries, prompts, labels)")
        elif not re.match(r"https?://", url):
            raise ArgumentError(
                f"--reward.remote_url {url!r} is neither an http(s):// URL nor (as the first entry) a .py file "
                f"defining reward_func; fix the entry"
            )


# ----------------------------------------------------------------------------- resuming


MODEL_STATES_STAGE_3 = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")
OPTIM_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def check_resume_layout(args: SimpleNamespace, tag_dir: str, student_weights: Optional[Dict]) -> None:
    """The checkpoint fits this launch: the same ZeRO stage, the same number of data-parallel ranks
    (DeepSpeed cannot re-partition optimizer states without --ds.use_universal_ckpt), the same model."""
    from tsdkd_plugin.host.checkpoint import checkpoint_parameter_shapes

    files = os.listdir(tag_dir)
    stage_3 = any(MODEL_STATES_STAGE_3.search(f) for f in files)
    if stage_3 != (args.ds.zero_stage == 3):
        saved = "3" if stage_3 else "0, 1 or 2"
        raise ArgumentError(
            f"--ckpt.load_enable: {tag_dir} was saved with --ds.zero_stage {saved}, this launch uses "
            f"--ds.zero_stage {args.ds.zero_stage}; resume with the stage it was saved with"
        )
    saved_ranks = {int(m.group(1)) for f in files for m in [OPTIM_STATES.search(f)] if m}
    ranks = data_parallel_ranks(args)
    if saved_ranks and len(saved_ranks) != ranks and not args.ds.use_universal_ckpt:
        raise ArgumentError(
            f"--ckpt.load_enable: {tag_dir} was saved by {len(saved_ranks)} data-parallel rank(s), this launch has "
            f"{ranks} (--actor.num_nodes x --actor.num_gpus_per_node); resume with the same GPUs, or convert it to a "
            f"universal checkpoint and add --ds.use_universal_ckpt"
        )
    if not student_weights or args.ds.lora.rank > 0:
        return
    for name, shape in checkpoint_parameter_shapes(tag_dir).items():
        hf_name = name[len("model."):] if name.startswith("model.") else name
        if hf_name in student_weights and tuple(student_weights[hf_name]) != tuple(shape):
            raise ArgumentError(
                f"--ckpt.load_enable: {tag_dir} was saved from another model ({hf_name} is {list(shape)} there, "
                f"{list(student_weights[hf_name])} in --actor.model_name_or_path {args.actor.model_name_or_path!r}); "
                f"point --ckpt.path elsewhere or resume with the model it was trained from"
            )


def check_resume_checkpoint(args: SimpleNamespace, student_weights: Optional[Dict] = None) -> None:
    """With --ckpt.load_enable, the checkpoint `latest` names must be loadable (or absent:
    then training starts at step 0), instead of failing deep inside DeepSpeed's load."""
    if not args.ckpt.load_enable:
        return
    if os.path.exists(args.ckpt.path) and not os.path.isdir(args.ckpt.path):
        raise ArgumentError(f"--ckpt.path {args.ckpt.path!r} is a file, not a checkpoint directory; point it elsewhere")
    ckpt_dir = actor_checkpoint_dir(args.ckpt.path)
    problem = checkpoint_problem(ckpt_dir)
    if problem:
        raise ArgumentError(f"--ckpt.load_enable: {problem}")
    tag = read_latest(ckpt_dir)
    if tag:
        check_resume_layout(args, os.path.join(ckpt_dir, tag), student_weights)
