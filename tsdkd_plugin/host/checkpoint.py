"""Atomic DeepSpeed checkpoints for the policy actor, and what a resume can rely on.

Upstream `DeepspeedStrategy.save_ckpt` first deletes old checkpoints to make room, then
saves, and DeepSpeed rewrites `latest` in place: a kill while saving can leave no
usable checkpoint (with --ckpt.max_num 1) or an empty `latest`. Here a save is:

1. every rank writes the new tag into `<tag>.partial` (DeepSpeed, save_latest=False);
   rank 0 adds upstream's metric.json there;
2. rank 0 renames `<tag>.partial` to `<tag>` (atomic: a tag directory is complete or absent);
3. rank 0 points `latest` at it atomically (temp file + fsync + os.replace);
4. rank 0 rotates: keeps the --ckpt.max_num newest regular tags (by mtime) and never the
   one `latest` names; upstream's `best_*` tags are only replaced by a newer best; leftovers
   of an interrupted save (`*.partial`) are removed; --ckpt.max_mem is honoured as upstream.

A kill at any point leaves `latest` naming a complete tag (or no `latest` before the first
save finished, which resumes from step 0). Like upstream (DeepSpeed writes `latest` on
rank 0 only), --ckpt.path must be one filesystem shared by all nodes. The guarantee is
against process kills; durability across a host crash depends on the filesystem (only
`latest` is fsync'ed).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from typing import Callable, Dict, Iterable, List, Optional

LATEST_FILE = "latest"
STAGING_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
BEST_PREFIX = "best"


def actor_checkpoint_dir(ckpt_path: str) -> str:
    """Where upstream's policy actor keeps its DeepSpeed checkpoints."""
    return os.path.join(ckpt_path, "_actor")


def fresh_checkpoint_states() -> Dict:
    """The states upstream's PPOTrainer.fit starts from when there is nothing to resume."""
    return {"episode": 0, "global_step": 0, "total_consumed_prompts": 0, "data_loader_state_dict": {}}


def read_latest(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, LATEST_FILE)) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def write_latest(ckpt_dir: str, tag: str) -> None:
    """Point `latest` at `tag` atomically: readers see the old or the new name, never a partial file."""
    temporary = os.path.join(ckpt_dir, f".{LATEST_FILE}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(ckpt_dir, LATEST_FILE))
    directory = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _is_leftover(name: str) -> bool:
    return name.endswith((STAGING_SUFFIX, REPLACED_SUFFIX))


def _tag_dirs(ckpt_dir: str) -> List[str]:
    return [d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d))]


def _size_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def rotate_checkpoints(ckpt_dir: str, max_num: int, max_mem_gib: float, new_tag: str) -> List[str]:
    """Delete what the limits exclude; returns the deleted directory names.

    Never deleted: the tag `latest` names, `new_tag`, and best_* tags other than by a newer best."""
    protected = {new_tag, read_latest(ckpt_dir)}
    names = _tag_dirs(ckpt_dir)
    doomed = [d for d in names if _is_leftover(d)]  # an interrupted save: never loadable
    if new_tag.startswith(BEST_PREFIX):
        doomed += [d for d in names if d.startswith(BEST_PREFIX) and not _is_leftover(d) and d not in protected]
    regular = [d for d in names if not d.startswith(BEST_PREFIX) and not _is_leftover(d)]
    regular.sort(key=lambda d: (os.path.getmtime(os.path.join(ckpt_dir, d)), d), reverse=True)  # newest first
    doomed += [d for d in regular[max(max_num, 1):] if d not in protected]
    for name in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    survivors = [d for d in regular if d not in doomed]
    max_bytes = max_mem_gib * 1024**3
    while sum(_size_bytes(os.path.join(ckpt_dir, d)) for d in _tag_dirs(ckpt_dir)) > max_bytes:
        evictable = [d for d in reversed(survivors) if d not in protected]  # oldest first
        if not evictable:
            break
        shutil.rmtree(os.path.join(ckpt_dir, evictable[0]), ignore_errors=True)
        survivors.remove(evictable[0])
        doomed.append(evictable[0])
    return doomed


def save_checkpoint_atomically(
    engine,
    ckpt_dir: str,
    tag: str,
    *,
    client_state: Dict,
    max_num: int,
    max_mem_gib: float,
    is_rank_0: bool,
    barrier: Callable[[], None],
    write_metric: Optional[Callable[[str], None]] = None,
    write_rank_files: Optional[Callable[[str], None]] = None,
) -> None:
    """Save `engine` (a DeepSpeedEngine) as `tag` in the steps of the module docstring.

    Collective: every rank calls it. `write_metric(tag_dir)` writes upstream's metric.json;
    `write_rank_files(tag_dir)`, called on every rank, adds that rank's own files (its RNG state)."""
    staging_tag = tag + STAGING_SUFFIX
    staging_dir, final_dir = os.path.join(ckpt_dir, staging_tag), os.path.join(ckpt_dir, tag)
    if is_rank_0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)  # files of an earlier interrupted save of this tag
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=staging_tag, client_state=client_state, save_latest=False)
    if write_rank_files is not None:
        write_rank_files(staging_dir)
    barrier()
    if is_rank_0:
        if write_metric is not None:
            write_metric(staging_dir)
        if os.path.exists(final_dir):  # the same tag saved again (e.g. a fresh run in an old directory)
            replaced = final_dir + REPLACED_SUFFIX
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final_dir, replaced)
        os.rename(staging_dir, final_dir)
        write_latest(ckpt_dir, tag)
        rotate_checkpoints(ckpt_dir, max_num, max_mem_gib, tag)
    barrier()


def _complete_torch_file(path: str) -> bool:
    """torch.save writes a zip archive whose directory comes last: a truncated file has none.
    Reads the archive's directory only, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _load_model_states(path: str):
    """A DeepSpeed model-states file with its tensors memory-mapped, not read (data.pkl only)."""
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _first_model_states(files: List[str]) -> Optional[str]:
    """The data-parallel rank-0 model-states file (ZeRO 0-2: mp_rank_00_…; ZeRO-3: zero_pp_rank_0_…)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if name in files:
            return name
    return next((f for f in files if f.endswith("model_states.pt")), None)


def tag_problem(ckpt_dir: str, tag: str) -> Optional[str]:
    """Why `<ckpt_dir>/<tag>` is not a complete DeepSpeed checkpoint, or None."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} does not exist"
    try:
        files = sorted(os.listdir(tag_dir))
    except OSError as error:
        return f"{tag_dir} cannot be listed ({error.strerror})"
    model_states = _first_model_states(files)
    if model_states is None:
        return f"{tag_dir} has no DeepSpeed model states file (*model_states.pt)"
    for name in files:
        if name.endswith(".pt") and not _complete_torch_file(os.path.join(tag_dir, name)):
            return f"{os.path.join(tag_dir, name)} is truncated or corrupt"
    path = os.path.join(tag_dir, model_states)
    try:
        states = _load_model_states(path)
    except Exception as error:  # a complete archive whose pickle cannot be read
        return f"{path} cannot be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]})"
    if not isinstance(states, dict) or "module" not in states:
        return f"{path} is not a DeepSpeed model-states file (it has no 'module' entry)"
    return None


def checkpoint_parameter_shapes(tag_dir: str) -> Dict[str, tuple]:
    """{parameter name: shape} recorded in a tag's model-states file (the module's state dict, or
    DeepSpeed's param_shapes under ZeRO-3), without reading the tensors."""
    name = _first_model_states(sorted(os.listdir(tag_dir)))
    if name is None:
        return {}
    states = _load_model_states(os.path.join(tag_dir, name))
    module = states.get("module") if isinstance(states, dict) else None
    if isinstance(module, dict) and module:
        return {k: tuple(v.shape) for k, v in module.items() if hasattr(v, "shape")}
    shapes = {}
    for group in (states.get("param_shapes") or []) if isinstance(states, dict) else []:
        shapes.update({k: tuple(v) for k, v in dict(group).items()})
    return shapes


def complete_tags(ckpt_dir: str, exclude: Iterable[str] = ()) -> List[str]:
    """Tags in ckpt_dir that look complete, newest first."""
    names = [d for d in _tag_dirs(ckpt_dir) if not _is_leftover(d) and d not in set(exclude)]
    names.sort(key=lambda d: os.path.getmtime(os.path.join(ckpt_dir, d)), reverse=True)
    return [d for d in names if tag_problem(ckpt_dir, d) is None]


def checkpoint_problem(ckpt_dir: str) -> Optional[str]:
    """Why resuming from ckpt_dir (the `_actor` directory) would fail, as a clause naming the
    file and the fix; None when it would load, or when there is nothing to resume yet
    (no directory, or no `latest` because no save has completed: training starts at step 0)."""
    if not os.path.lexists(ckpt_dir):
        return None
    if not os.path.isdir(ckpt_dir):
        return f"{ckpt_dir} is not a directory; move it away or point --ckpt.path elsewhere"
    if not os.access(ckpt_dir, os.R_OK | os.X_OK):
        return f"{ckpt_dir} is not readable by this user; fix its permissions or point --ckpt.path elsewhere"
    latest_path = os.path.join(ckpt_dir, LATEST_FILE)
    if not os.path.lexists(latest_path):
        return None
    tag = None
    try:
        with open(latest_path) as handle:
            tag = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        problem = f"{latest_path} cannot be read ({getattr(error, 'strerror', None) or error})"
    else:
        problem = f"{latest_path} is empty" if not tag else tag_problem(ckpt_dir, tag)
    if problem is None:
        return None
    earlier = complete_tags(ckpt_dir, exclude=[tag] if tag else [])
    fix = (f"write the name of a complete earlier tag ({', '.join(earlier[:3])}) into {latest_path}"
           if earlier else "no complete tag is left")
    return f"the checkpoint to resume from is unusable: {problem}; {fix}, or move {ckpt_dir} away to start from step 0"


# ----------------------------------------------------------------------------- random number generators
# What decides a resumed step besides weights, optimizer and data position: the RNG states of the
# driver (saved in the client states) and of every policy rank (its replay buffer's shuffle, dropout;
# one file per rank in the tag directory, since DeepSpeed keeps only rank 0's client states).

DRIVER_RNG_KEY = "tsdkd_driver_rng_state"


def rank_rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"tsdkd_rng_state_rank{rank}.pt")


def capture_rng_state() -> Dict:
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states of this process."""
    import random

    import numpy
    import torch

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict]) -> bool:
    """Set this process's RNGs back to a `capture_rng_state()`; False when there is none to restore."""
    if not state:
        return False
    import random

    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def save_rank_rng_state(tag_dir: str, rank: int) -> None:
    import torch

    torch.save(capture_rng_state(), rank_rng_file(tag_dir, rank))


def restore_rank_rng_state(ckpt_dir: str, rank: int) -> bool:
    """Restore this rank's RNGs from the tag `latest` names (the one a resume just loaded); False for
    checkpoints written before RNG states were saved."""
    import torch

    tag = read_latest(ckpt_dir)
    path = rank_rng_file(os.path.join(ckpt_dir, tag), rank) if tag else None
    if path is None or not os.path.isfile(path):
        return False
    return restore_rng_state(torch.load(path, map_location="cpu", weights_only=False))


def resume_hint(ckpt_path: str) -> str:
    """How to continue after a stop, for the stop message."""
    ckpt_dir = actor_checkpoint_dir(ckpt_path)
    tag = read_latest(ckpt_dir)
    if tag:
        return f"rerun the same command with --ckpt.load_enable to resume from {tag} in {ckpt_dir}"
    return (f"rerun the same command to start over (no checkpoint was saved in {ckpt_dir}; "
            f"--ckpt.save_steps N saves one every N steps)")
