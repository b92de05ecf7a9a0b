"""tsdkd_plugin.host.dataset_columns: upstream SFT / preference datasets read the same samples from lists.

Each dataset is built twice from the same local file with upstream's own constructor: once as
pristine OpenRLHF builds it (lazy `datasets` columns) and once with the constructors wrapped. Every
sample and every collated batch must be equal, and the wrapped one must hold plain lists.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from tsdkd_plugin.host import cpu_launch, dataset_columns

datasets = pytest.importorskip("datasets")


@pytest.fixture
def restore_dataset_classes():
    """The wrap is global on the classes (and other tests run cpu_launch in this process): each test
    starts from upstream's own constructors, and what was there before is put back after it."""
    import importlib

    classes = [getattr(importlib.import_module(m), c) for m, c in dataset_columns.DATASET_CLASSES]
    saved = [cls.__dict__["__init__"] for cls in classes]
    for cls, init in zip(classes, saved, strict=True):
        while getattr(init, dataset_columns._MARK, False):
            init = init.__wrapped__
        cls.__init__ = init
    yield classes
    for cls, init in zip(classes, saved, strict=True):
        cls.__init__ = init


def _strategy(**data) -> SimpleNamespace:
    return SimpleNamespace(args=SimpleNamespace(data=SimpleNamespace(apply_chat_template=True, **data)))


def _assert_same_value(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_value(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _build_twice(make):
    """(pristine dataset, dataset built with the wrapped constructor)."""
    pristine = make()
    assert dataset_columns.hold_columns_as_lists() == [f"{m}.{c}" for m, c in dataset_columns.DATASET_CLASSES]
    return pristine, make()


def _check_same_samples(pristine, held, column_attrs) -> None:
    column_type = dataset_columns.lazy_column_type()
    for name in column_attrs:
        if column_type is not None:
            assert isinstance(getattr(pristine, name), column_type), f"{name}: upstream no longer keeps a lazy column"
        assert type(getattr(held, name)) is list, name
    assert len(pristine) == len(held) > 0
    for i in range(len(pristine)):
        _assert_same_value(pristine[i], held[i], f"sample {i}")
    batch = list(range(len(pristine)))
    _assert_same_value(
        pristine.collate_fn([pristine[i] for i in batch]), held.collate_fn([held[i] for i in batch]), "batch"
    )


def test_sft_dataset_samples_are_unchanged(restore_dataset_classes, arith_data_dir, toy_tokenizer):
    from openrlhf.datasets import SFTDataset

    rows = datasets.load_dataset("json", data_files=str(arith_data_dir / "sft_train.jsonl"), split="train")
    strategy = _strategy(input_key="prompt", output_key="response")
    pristine, held = _build_twice(lambda: SFTDataset(rows, toy_tokenizer, 96, strategy, num_processors=1))
    _check_same_samples(pristine, held, ["prompts", "responses", "prompt_ids_lens"])


def test_dpo_dataset_samples_are_unchanged(restore_dataset_classes, arith_data_dir, toy_tokenizer):
    from openrlhf.datasets import RewardDataset

    rows = datasets.load_dataset("json", data_files=str(arith_data_dir / "dpo_train.jsonl"), split="train")
    strategy = _strategy(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected")
    pristine, held = _build_twice(
        lambda: RewardDataset(rows, toy_tokenizer, 96, strategy, is_dpo=True, num_processors=1)
    )
    _check_same_samples(pristine, held, ["prompts", "chosens", "rejects", "extras"])


def test_the_wrap_keeps_the_signature_and_is_installed_once(restore_dataset_classes):
    signatures = [inspect.signature(cls.__init__) for cls in restore_dataset_classes]
    inits = [cls.__init__ for cls in restore_dataset_classes]
    dataset_columns.hold_columns_as_lists()
    wrapped = [cls.__init__ for cls in restore_dataset_classes]
    assert [inspect.signature(cls.__init__) for cls in restore_dataset_classes] == signatures
    assert all(w is not i for w, i in zip(wrapped, inits, strict=True))
    dataset_columns.hold_columns_as_lists()  # a second install wraps nothing again
    assert [cls.__init__ for cls in restore_dataset_classes] == wrapped


def test_columns_to_lists_replaces_only_columns():
    class Column(list):  # stands in for datasets' lazy column type
        pass

    obj = SimpleNamespace(a=Column([1, 2]), b=[3], c="text", d=None)
    assert dataset_columns.columns_to_lists(obj, Column) == ["a"]
    assert type(obj.a) is list and obj.a == [1, 2] and obj.b == [3] and obj.c == "text" and obj.d is None


def test_cpu_launch_installs_it_for_single_process_trainers(restore_dataset_classes, tmp_path, monkeypatch):
    """What the module sees when cpu_launch runs it as train_sft / train_dpo are run."""
    from tsdkd_plugin.host import device

    for name in [*device.CPU_MODE_ENV_DEFAULTS, "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "RANK",
                 "WORLD_SIZE", "LOCAL_RANK"]:  # fmt: skip
        monkeypatch.setenv(name, "placeholder")  # restored after the test: cpu_launch writes os.environ
        monkeypatch.delenv(name)
    monkeypatch.setenv("TSDKD_DEVICE", "cpu")
    monkeypatch.setattr("sys.argv", ["pytest"])
    seen = tmp_path / "seen.txt"
    (tmp_path / "tsdkd_columns_probe.py").write_text(
        "from openrlhf.datasets import RewardDataset, SFTDataset\n"
        f"marks = [getattr(c.__init__, {dataset_columns._MARK!r}, False) for c in (SFTDataset, RewardDataset)]\n"
        f"open({str(seen)!r}, 'w').write(repr(marks))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cpu_launch.main(["--no-ray", "tsdkd_columns_probe"])
    installed = dataset_columns.lazy_column_type() is not None  # a no-op where datasets has no lazy columns
    assert seen.read_text() == repr([installed, installed])
