"""The GPU install in README.md agrees with what OpenRLHF 0.11.2 and the extras require.

A CUDA install cannot run here; what can be checked offline is that the documented commands pin
what the installed OpenRLHF wheel's metadata requires (vLLM, flash-attn), in an order that works
(torch before flash-attn's build, which must not be isolated), and that the `gpu` and `eval`
extras bring math-verify with one antlr4 runtime between them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gpu_install_commands():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Install on a GPU cluster"):text.index("## CPU mode")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def openrlhf_requirement(name: str, extra: str = "") -> str:
    for requirement in metadata.requires("openrlhf"):
        spec, _, marker = requirement.partition(";")
        in_extra = f'extra == "{extra}"' in marker if extra else "extra" not in marker
        if re.match(rf"{re.escape(name)}\b", spec.strip()) and in_extra:
            return spec.strip().replace(" ", "")
    raise AssertionError(f"openrlhf requires no {name} (extra {extra!r})")


def extras():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_readme_installs_vllm_then_flash_attn_without_isolation_then_the_plugin():
    commands = gpu_install_commands()
    vllm = openrlhf_requirement("vllm", extra="vllm")  # vllm==0.29.0
    flash_attn = openrlhf_requirement("flash-attn")  # flash-attn==2.8.3
    order = [next(i for i, c in enumerate(commands) if needle in c)
             for needle in (f"pip install {vllm}", f"pip install {flash_attn}", '"tsdkd-plugin[gpu')]
    assert order == sorted(order), commands
    flash_command = commands[order[1]]
    assert "--no-build-isolation" in flash_command.split(), flash_command
    assert any(c.startswith("pip install") and "ninja" in c.split() and "packaging" in c.split() for c in commands)


def test_gpu_extra_brings_openrlhf_and_math_verify_on_the_antlr4_of_the_eval_extra():
    gpu, evaluation = extras()["gpu"], extras()["eval"]
    assert "openrlhf[vllm]==0.11.2" in gpu
    math_verify = next(r for r in gpu if r.startswith("math-verify"))
    # The version these tests run (the verifier's behaviour was checked with it).
    assert math_verify.endswith(f"=={metadata.version('math-verify')}")
    # lm_eval[math] asks for math_verify[antlr4_11_0]: the same antlr4 runtime, so gpu+eval resolve.
    lm_eval_math = [r for r in metadata.requires("lm_eval") if r.startswith("math_verify[") and '"math"' in r]
    assert lm_eval_math and "antlr4_11_0" in lm_eval_math[0] and "[antlr4_11_0]" in math_verify
    assert evaluation == [f"lm_eval[math,ifeval]=={metadata.version('lm_eval')}"]
