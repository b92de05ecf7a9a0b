"""The fixture cache: keyed by recipe, deterministic, never overwritten, written atomically."""

import os

import pytest

from tsdkd_plugin.testing import tree_digest
from tsdkd_plugin.toy import cache
from tsdkd_plugin.toy.models import STUDENT_RECIPE


def test_builds_are_deterministic(tmp_path, toy_tokenizer_dir, toy_student_dir):
    """A fresh build in another cache gets the same key and the same bytes as the session's fixtures."""
    fresh_tokenizer = cache.toy_tokenizer_dir(tmp_path)
    fresh_student = cache.toy_model_dir(STUDENT_RECIPE, tmp_path)
    assert fresh_tokenizer.name == toy_tokenizer_dir.name
    assert fresh_student.name == toy_student_dir.name
    assert tree_digest(fresh_tokenizer) == tree_digest(toy_tokenizer_dir)
    assert tree_digest(fresh_student) == tree_digest(toy_student_dir)


def test_key_follows_recipe():
    assert cache.recipe_key("k", {"a": 1, "b": 2}) == cache.recipe_key("k", {"b": 2, "a": 1})
    assert cache.recipe_key("k", {"a": 1}) != cache.recipe_key("k", {"a": 2})
    assert cache.recipe_key("k", {"a": 1}) != cache.recipe_key("other", {"a": 1})
    assert cache.recipe_key("k", {"a": 1}, ("torch",)) != cache.recipe_key("k", {"a": 1}, ())


def _writer(calls, content="built"):
    def build(out):
        calls.append(out)
        (out / "payload.txt").write_text(content)

    return build


def test_existing_entry_is_reused_not_rebuilt(tmp_path):
    calls = []
    first = cache.cached_build("thing", {"v": 1}, _writer(calls, "first"), tmp_path)
    second = cache.cached_build("thing", {"v": 1}, _writer(calls, "second"), tmp_path)
    assert first == second and len(calls) == 1
    assert (first / "payload.txt").read_text() == "first"
    # A changed recipe goes to a new directory; the old one stays as it was.
    third = cache.cached_build("thing", {"v": 2}, _writer(calls, "third"), tmp_path)
    assert third != first and (first / "payload.txt").read_text() == "first"


def test_foreign_directory_under_the_final_name_is_never_used_or_overwritten(tmp_path):
    final = tmp_path / f"thing-{cache.recipe_key('thing', {'v': 1})}"
    final.mkdir()
    (final / "half-written.bin").write_bytes(b"\0")
    with pytest.raises(RuntimeError, match="not a complete thing fixture"):
        cache.cached_build("thing", {"v": 1}, _writer([]), tmp_path)
    assert [p.name for p in final.iterdir()] == ["half-written.bin"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    def crash(out):
        (out / "partial.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # also interrupts, not only exceptions, must clean up

    with pytest.raises(KeyboardInterrupt):
        cache.cached_build("thing", {"v": 1}, crash, tmp_path)
    assert list(tmp_path.iterdir()) == []
    # The next attempt builds normally.
    calls = []
    built = cache.cached_build("thing", {"v": 1}, _writer(calls), tmp_path)
    assert len(calls) == 1 and (built / cache.MARKER_FILE).is_file()
    # Builds happen in a hidden temp dir, renamed only when complete.
    assert calls[0] != built and calls[0].name.startswith(".thing-")
    assert not calls[0].exists()


def test_concurrent_builder_wins_the_race(tmp_path):
    """When another process renames its finished build first, ours is discarded and theirs is used."""
    calls = []

    def build_while_other_finishes(out):
        calls.append(out)
        (out / "payload.txt").write_text("ours")
        cache.cached_build("thing", {"v": 1}, _writer([], "theirs"), tmp_path)

    result = cache.cached_build("thing", {"v": 1}, build_while_other_finishes, tmp_path)
    assert (result / "payload.txt").read_text() == "theirs"
    assert not calls[0].exists()
    assert sorted(os.listdir(tmp_path)) == [result.name]
