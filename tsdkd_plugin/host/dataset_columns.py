"""Hold the row columns of OpenRLHF's SFT and preference datasets as Python lists.

OpenRLHF 0.11.2's `SFTDataset` and `RewardDataset` (used by `train_sft`, `train_dpo`, `train_rm`)
keep `processed_dataset["prompt"]` and its siblings and read them one row at a time in
`__getitem__`. With `datasets` >= 4 such a column is a lazy `datasets.arrow_dataset.Column`:
every row read selects the column from the Arrow table again (about 0.2 ms a read, three or four
reads per sample). On the toy models of the built-in experiments that is about a fifth of a
`train_sft` step on CPU (py-spy, 2026-12-07), spent re-reading strings already in memory.

`hold_columns_as_lists()` wraps the two classes' `__init__` so that, once upstream's own
constructor has run, every attribute that is such a column is replaced by `list(column)`: the
same values in the same order, so the samples, batches and trained weights are unchanged (the
toy builds' cache keys stay valid). It changes no signature and the plugin relies on it for
nothing but speed; `tsdkd_plugin.host.cpu_launch` installs it for the single-process trainers it
runs (patches/README.md, item 8).
"""

from __future__ import annotations

import functools
from typing import Any

# Upstream classes whose constructors keep lazy columns (openrlhf 0.11.2).
DATASET_CLASSES = (
    ("openrlhf.datasets.sft_dataset", "SFTDataset"),
    ("openrlhf.datasets.reward_dataset", "RewardDataset"),
)

_MARK = "__tsdkd_columns_as_lists__"


def lazy_column_type() -> type | None:
    """`datasets.arrow_dataset.Column` where this `datasets` has it (>= 4), else None."""
    try:
        from datasets.arrow_dataset import Column
    except ImportError:
        return None
    return Column


def columns_to_lists(obj: Any, column_type: type) -> list[str]:
    """Replace each attribute of `obj` that is a `column_type` by a list of its values; the names replaced."""
    replaced = []
    for name, value in list(vars(obj).items()):
        if isinstance(value, column_type):
            setattr(obj, name, list(value))
            replaced.append(name)
    return replaced


def hold_columns_as_lists() -> list[str]:
    """Wrap the upstream dataset constructors (idempotent); the classes wrapped now or before.

    A no-op where `datasets` has no lazy column type."""
    import importlib

    column_type = lazy_column_type()
    if column_type is None:
        return []
    wrapped = []
    for module_name, class_name in DATASET_CLASSES:
        cls = getattr(importlib.import_module(module_name), class_name)
        wrapped.append(f"{module_name}.{class_name}")
        if getattr(cls.__init__, _MARK, False):
            continue
        upstream_init = cls.__init__

        @functools.wraps(upstream_init)
        def init(self, *args, _upstream_init=upstream_init, **kwargs):
            _upstream_init(self, *args, **kwargs)
            columns_to_lists(self, column_type)

        setattr(init, _MARK, True)
        cls.__init__ = init
    return wrapped
