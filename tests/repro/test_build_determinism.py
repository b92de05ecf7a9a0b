"""Teacher and student builds are deterministic: the same recipe gives the same weights, byte for
byte, whatever the calling environment's thread settings and the machine's load. The recipe fixes
the training process's thread count (SFTRecipe.threads); a different count gives other weights,
which is why it is part of the recipe (and of the cache key)."""

import hashlib
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from tsdkd_plugin.experiments.budgets import BUDGETS, with_difficulty_lengths
from tsdkd_plugin.experiments.trained_models import trained_model_dir

pytestmark = pytest.mark.slow


def _weights_digest(model_dir):
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_same_recipe_same_weights_under_load_and_other_thread_settings(tmp_path, monkeypatch):
    recipe = with_difficulty_lengths(BUDGETS["smoke"], "easy").teacher
    first, built = trained_model_dir(recipe, "easy", tmp_path / "a", work_dir=tmp_path / "logs-a", timeout_s=900)
    assert built

    # A second build from scratch, with the caller asking for one OpenMP thread and a busy core beside it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        second, built = trained_model_dir(recipe, "easy", tmp_path / "b", work_dir=tmp_path / "logs-b", timeout_s=900)
    finally:
        burner.kill()
        burner.wait()
    assert built and second.name == first.name
    assert _weights_digest(second) == _weights_digest(first)

    # The control: another thread count in the recipe is another model (and another cache entry).
    monkeypatch.delenv("OMP_NUM_THREADS")
    other, _ = trained_model_dir(
        replace(recipe, threads=1), "easy", tmp_path / "a", work_dir=tmp_path / "logs-c", timeout_s=900
    )
    assert other != first
    assert _weights_digest(other) != _weights_digest(first)
    assert os.path.isdir(first)
