"""Fixtures shared by the recipe tests: every recipe parsed once per session.

Parsing loads OpenRLHF's CLI modules (tens of seconds on a busy 2-core machine), so all tests
that need a parsed recipe share one in-process parse of each script.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def recipe_paths():
    from tsdkd_plugin.recipes_tools.recipe_check import recipe_scripts

    return recipe_scripts()


@pytest.fixture(scope="session")
def parsed_recipes(recipe_paths):
    """{script name: ParsedRecipe}, with placeholders for the variables multi-node recipes require."""
    from tsdkd_plugin.recipes_tools.recipe_check import EXAMPLE_ENV, parse_recipe

    env = dict(EXAMPLE_ENV)
    # A user's environment must not leak into what the recipes print.
    for name in ("STUDENT_MODEL", "TEACHER_MODEL", "PROMPT_DATA", "OUTPUT_DIR", "WANDB_API_KEY", "NUM_GPUS"):
        if name in os.environ:
            env[name] = ""
    return {path.name: parse_recipe(path, env) for path in recipe_paths}


@pytest.fixture
def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clean_env():
    """The environment a user would launch from: no recipe variables set, repo's venv on PATH."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "TSDKD_RECIPE_", "WANDB_")) and key not in (
               "STUDENT_MODEL", "TEACHER_MODEL", "PROMPT_DATA", "OUTPUT_DIR", "SHARED_DIR", "NUM_GPUS", "WORK_DIR",
               "DPO_PAIRS", "REWARD_FUNC")}
    return env
