import pytest

from tsdkd_plugin.experiments import comparison
from tsdkd_plugin.experiments.budgets import BUDGETS


@pytest.fixture
def models_not_built(monkeypatch, tmp_path):
    """Call it with a run dir: the comparison's regimes then build no teacher or student and load no
    prompts (their states point at placeholder paths under it), for tests whose runs are fakes."""

    def stub(run_dir):
        def fake_prepare(regime, options):
            root = run_dir / regime.name
            state = comparison.RegimeState(regime=regime, budget=BUDGETS[regime.budget], root=root)
            state.files = {"prompts_train": root / "prompts_train.jsonl"}
            state.models = {"teacher": tmp_path / "teacher", "student": tmp_path / "student"}
            return state

        monkeypatch.setattr(comparison, "prepare_regime", fake_prepare)
        monkeypatch.setattr(comparison, "load_prompt_rows", lambda path: [])

    return stub
