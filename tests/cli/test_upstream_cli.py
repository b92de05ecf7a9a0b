"""host/upstream_cli.py: upstream's `__main__` block split around `parse_args()`, and a loud refusal of any
other structure (so an OpenRLHF release that moves its parser fails here, not in a user's launch)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tsdkd_plugin.host.upstream_cli import UpstreamCLIError, load_upstream_cli

GOOD = """
import argparse

def train(args):
    raise AssertionError("the plugin never calls upstream's train")

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--actor.lr", type=float, default=1.0)
    args = parser.parse_args()
    args.doubled = getattr(args, "actor.lr") * 2
    assert args.doubled > 0, "lr must be positive"
    train(args)
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        return name

    return write


def test_the_two_halves_run_around_our_parse(fake_module):
    cli = load_upstream_cli(fake_module("fake_train_good", GOOD))
    parser = cli.build_parser()
    parser.add_argument("--tsdkd.extra", type=int, default=3)  # what add_tsdkd_arguments does
    args = cli.finalize(parser.parse_args(["--actor.lr", "2.5"]))
    assert args.doubled == 5.0 and getattr(args, "tsdkd.extra") == 3
    with pytest.raises(AssertionError, match="lr must be positive"):  # upstream's validation runs
        cli.finalize(parser.parse_args(["--actor.lr", "-1"]))


@pytest.mark.parametrize("source, why", [
    (GOOD.replace("    train(args)\n", ""), "end with `train(args)`"),
    (GOOD.replace("    args = parser.parse_args()\n", ""), "one `args = parser.parse_args()`"),
    (GOOD.replace('"__main__"', '"__not_main__"'), "one `if __name__ == '__main__':` block"),
])
def test_another_structure_is_refused(fake_module, source, why):
    with pytest.raises(UpstreamCLIError, match=why.replace("(", r"\(").replace(")", r"\)")):
        load_upstream_cli(fake_module(f"fake_train_{abs(hash(why))}", source))
