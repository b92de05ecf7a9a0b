"""scripts/setup_cpu.sh refuses a too-old Python, a short disk and a missing pinned wheel with
one clear sentence (each check runs before anything slow)."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup_cpu.sh"


def run_setup(venv, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SETUP), str(venv)], env=env, capture_output=True, text=True, timeout=300)


def test_too_old_python_is_refused(tmp_path):
    fake = tmp_path / "python3.8"
    fake.write_text('#!/bin/bash\nif [ "$1" = "-c" ]; then echo 3.8.10; exit 0; fi\ncat >/dev/null\nexit 1\n')
    fake.chmod(0o755)
    result = run_setup(tmp_path / "venv", PYTHON=str(fake))
    assert result.returncode != 0
    assert "Python 3.8.10 is not supported" in result.stderr and "PYTHON=" in result.stderr


def test_short_disk_is_refused(tmp_path):
    result = run_setup(tmp_path / "venv", TSDKD_SETUP_MIN_FREE_GB="100000000")
    assert result.returncode != 0
    assert "GiB free" in result.stderr and "needs about 100000000 GiB" in result.stderr
    assert not (tmp_path / "venv").exists()  # refused before creating anything


def test_missing_pinned_wheel_is_named(tmp_path):
    result = run_setup(tmp_path / "venv", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "no-wheels-here"))
    assert result.returncode != 0
    assert "could not install" in result.stderr and "pinned wheel is missing" in result.stderr
