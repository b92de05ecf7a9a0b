"""`python -m openrlhf.cli.train_tsdkd` must work after install, from any directory,
in a fresh interpreter and in a Ray worker (the .pth import hook)."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_python(args, cwd, env_extra=None, timeout=180):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_alias_resolves_to_plugin_module():
    spec = importlib.util.find_spec("openrlhf.cli.train_tsdkd")
    assert spec is not None
    assert Path(spec.origin).resolve() == (REPO / "tsdkd_plugin/cli/train_tsdkd.py").resolve()


def test_help_from_another_directory_shows_tsdkd_groups(tmp_path):
    result = run_python(["-m", "openrlhf.cli.train_tsdkd", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "usage: python -m openrlhf.cli.train_tsdkd" in out
    assert "TSD-KD teacher (--teacher.*)" in out and "TSD-KD objective (--tsdkd.*)" in out
    for flag in (
        "--teacher.model_name_or_path",
        "--teacher.sparse_top_k",
        "--tsdkd.beta",
        "--actor.model_name_or_path",
        "--rollout.n_samples_per_prompt",
        "--vllm.num_engines",
        "--ds.zero_stage",
    ):
        assert flag in out, flag


def test_missing_model_path_is_one_line_error(tmp_path):
    result = run_python(["-m", "openrlhf.cli.train_tsdkd", "--data.prompt_dataset", "x.jsonl"], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "--actor.model_name_or_path is required" in lines[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_unknown_flag_fails_like_upstream(tmp_path):
    result = run_python(["-m", "openrlhf.cli.train_tsdkd", "--pretrain", "x"], cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --pretrain" in result.stderr


@pytest.mark.network
def test_alias_resolves_in_ray_worker():
    ray = pytest.importorskip("ray")

    @ray.remote
    def where_is_alias():
        import importlib.util as util

        spec = util.find_spec("openrlhf.cli.train_tsdkd")
        return None if spec is None else spec.origin

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        origin = ray.get(where_is_alias.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert origin is not None and origin.endswith("tsdkd_plugin/cli/train_tsdkd.py")


def test_regular_wheel_install_registers_the_alias(tmp_path):
    """Build a normal (non-editable) wheel, install it into a bare target dir, and check that its
    own .pth makes the alias resolve in an interpreter that does not see the editable install."""
    wheel_dir = tmp_path / "wheel"
    build = run_python(
        ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)],
        cwd=tmp_path,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("tsdkd_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "_tsdkd_plugin_register.pth" in names and "tsdkd_plugin/cli/train_tsdkd.py" in names

    target = tmp_path / "site"
    install = run_python(["-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    # -S: no site processing, so neither the editable install nor its .pth is active; then
    # addsitedir(target) processes only the wheel's .pth, as site-packages would at start-up.
    openrlhf_dir = Path(importlib.util.find_spec("openrlhf").origin).parent.parent
    probe = (
        f"import sys, site; sys.path.append({str(openrlhf_dir)!r}); site.addsitedir({str(target)!r}); "
        "import importlib.util as u; s = u.find_spec('openrlhf.cli.train_tsdkd'); print(s.origin)"
    )
    result = run_python(["-S", "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(target / "tsdkd_plugin/cli/train_tsdkd.py")
