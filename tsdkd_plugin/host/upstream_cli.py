"""Reuse OpenRLHF's own `train_ppo_ray` argument parser and its post-parse checks.

Upstream builds its parser inline under ``if __name__ == "__main__":`` (about 400
``add_argument`` calls), so it cannot be imported. Copying it would drift with
every upstream release. Instead we read that block from the installed module's
source and run it in two halves around ``parser.parse_args()``:

  1. the statements that build ``parser`` (we then add the ``--teacher.*`` and
     ``--tsdkd.*`` groups and parse);
  2. the statements after it (``hierarchize`` and upstream's validations), with
     upstream's final ``train(args)`` call removed.

So `--actor.*`, `--rollout.*`, `--vllm.*`, `--data.*`, `--ds.*`, `--train.*`,
logging and checkpoint flags are exactly upstream's, and unknown or stale flags
fail exactly as they do there. `load_upstream_cli` checks the structure this
relies on (one `__main__` block, one `parse_args()`, a final `train(args)`) and
raises `UpstreamCLIError` otherwise (tests/cli/test_upstream_cli.py), so an
upstream refactor fails loudly in every test that parses a command line.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType, SimpleNamespace

UPSTREAM_CLI_MODULE = "openrlhf.cli.train_ppo_ray"


class UpstreamCLIError(RuntimeError):
    """The installed OpenRLHF does not have the CLI structure this plugin expects."""


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    left, comparators = node.test.left, node.test.comparators
    return (
        isinstance(left, ast.Name)
        and left.id == "__name__"
        and len(comparators) == 1
        and isinstance(comparators[0], ast.Constant)
        and comparators[0].value == "__main__"
    )


def _is_parse_args(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "parse_args"
    )


def _is_train_call(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "train"
    )


@dataclass
class UpstreamCLI:
    """The two halves of upstream's ``__main__`` block, compiled, plus its globals."""

    module_name: str
    build_parser_code: CodeType
    finalize_args_code: CodeType
    module_globals: dict

    def build_parser(self) -> argparse.ArgumentParser:
        namespace = dict(self.module_globals)
        exec(self.build_parser_code, namespace)
        parser = namespace.get("parser")
        if not isinstance(parser, argparse.ArgumentParser):
            raise UpstreamCLIError(
                f"{self.module_name}: its __main__ block did not build an ArgumentParser named 'parser'"
            )
        return parser

    def finalize(self, flat_args: argparse.Namespace) -> SimpleNamespace:
        """Run upstream's post-parse code (hierarchize + validation) on parsed flat args."""
        namespace = dict(self.module_globals)
        namespace["args"] = flat_args
        exec(self.finalize_args_code, namespace)
        return namespace["args"]


def load_upstream_cli(module_name: str = UPSTREAM_CLI_MODULE) -> UpstreamCLI:
    module = importlib.import_module(module_name)
    source_file = inspect.getsourcefile(module)
    tree = ast.parse(inspect.getsource(module), filename=source_file)
    main_blocks = [node for node in tree.body if _is_main_guard(node)]
    if len(main_blocks) != 1:
        raise UpstreamCLIError(
            f"{module_name}: expected one `if __name__ == '__main__':` block, found {len(main_blocks)}"
        )
    body = main_blocks[0].body
    parse_positions = [i for i, node in enumerate(body) if _is_parse_args(node)]
    if len(parse_positions) != 1:
        raise UpstreamCLIError(f"{module_name}: expected one `args = parser.parse_args()` in __main__")
    split = parse_positions[0]
    before, after = body[:split], body[split + 1 :]
    if not after or not _is_train_call(after[-1]):
        raise UpstreamCLIError(f"{module_name}: expected __main__ to end with `train(args)`")
    after = after[:-1]

    def compile_block(statements: Sequence[ast.stmt]) -> CodeType:
        block = ast.Module(body=list(statements), type_ignores=[])
        return compile(block, filename=source_file, mode="exec")  # keeps upstream line numbers in tracebacks

    return UpstreamCLI(module_name, compile_block(before), compile_block(after), vars(module))
