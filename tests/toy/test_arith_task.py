"""The arithmetic task: generator, splits, worked solutions, verifier, files, bad input."""

import ast
import json
import operator
import re

import pytest

from tsdkd_plugin.toy import arith_task
from tsdkd_plugin.toy.arith_task import (
    DIFFICULTIES,
    SPLIT_NAMES,
    check_split_size,
    extract_final_answer,
    generate_splits,
    make_rejected_solution,
    split_of,
    verify,
    write_task_files,
)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Independent reference: Python's own parser gives normal precedence (products first)."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def test_generation_is_deterministic():
    a = generate_splits("easy", 50, 10, 10, seed=3)
    b = generate_splits("easy", 50, 10, 10, seed=3)
    c = generate_splits("easy", 50, 10, 10, seed=4)
    assert a == b
    assert [p.expression for p in a["train"]] != [p.expression for p in c["train"]]


def test_splits_are_disjoint_sized_and_stable():
    splits = generate_splits("easy", 300, 40, 40, seed=0)
    texts = {name: [p.expression for p in splits[name]] for name in SPLIT_NAMES}
    assert {name: len(t) for name, t in texts.items()} == {"train": 300, "val": 40, "test": 40}
    for name in SPLIT_NAMES:
        assert len(set(texts[name])) == len(texts[name])
        assert all(split_of(t) == name for t in texts[name])
    assert not set(texts["train"]) & set(texts["val"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["val"]) & set(texts["test"])
    # Asking for more training data leaves the held-out splits unchanged.
    bigger = generate_splits("easy", 900, 40, 40, seed=0)
    assert [p.expression for p in bigger["test"]] == texts["test"]
    assert [p.expression for p in bigger["train"]][:300] == texts["train"]


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_worked_solutions_are_correct(difficulty):
    level = DIFFICULTIES[difficulty]
    for problem in generate_splits(difficulty, 200, 20, 20, seed=1)["train"]:
        assert re.fullmatch(r"\d+(?:[-+*]\d+)+", problem.expression)
        assert level.min_ops <= problem.num_ops <= level.max_ops
        assert problem.num_ops == len(re.findall(r"[-+*]", problem.expression))
        assert "**" not in problem.expression and not re.search(r"\*\d+\*", problem.expression)
        assert problem.answer == evaluate(problem.expression)
        # Every step is right, and steps use only what is known at that point.
        known = [int(x) for x in re.findall(r"\d+", problem.expression)]
        products = re.findall(r"\d+\*\d+", problem.expression)
        for i, step in enumerate(problem.steps):
            lhs, result = step.split("=")
            assert evaluate(lhs) == int(result), step
            assert 0 <= int(result) <= level.max_value, step
            if i < len(products):
                assert lhs == products[i]  # products first, left to right
            else:
                assert int(re.match(r"\d+", lhs).group()) in known  # chains from a known value
            known.append(int(result))
        assert problem.steps[-1].endswith(f"={problem.answer}")
        assert problem.solution == "; ".join(problem.steps) + f". #### {problem.answer}"
        assert extract_final_answer(problem.solution) == problem.answer
        for operand in re.findall(r"(?<![*\d])\d+(?![*\d])", problem.expression):
            assert 0 <= int(operand) <= level.max_operand
        for a, b in re.findall(r"(\d+)\*(\d+)", problem.expression):
            assert 2 <= int(a) <= level.max_factor and 2 <= int(b) <= level.max_factor


def test_calibration_format():
    problem = generate_splits("easy", 5, 1, 1, seed=0)["train"][0]
    assert re.fullmatch(r"Q: [\d+*-]+=\? A: (\d+[-+*]\d+=\d+; )*\d+[-+*]\d+=\d+\. #### \d+", problem.text)


def test_rejected_solutions_are_wrong_but_well_formed():
    for problem in generate_splits("medium", 200, 20, 20, seed=2)["train"]:
        rejected = make_rejected_solution(problem)
        assert rejected != problem.solution
        assert verify(rejected, problem.answer) == 0
        steps = rejected.split(". ####")[0].split("; ")
        assert len(steps) == problem.num_ops
        assert all(int(step.split("=")[1]) >= 0 for step in steps)
        assert make_rejected_solution(problem) == rejected  # deterministic


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("24+72=96; 96-28=68. #### 68", "68", 1),
        ("24+72=96; 96-28=68. #### 68", 68, 1),
        ("#### 68<|im_end|>", "68", 1),
        ("blah ####68. Then more text #### 70", "68", 1),  # the first committed answer counts
        ("#### 1,068", "1068", 1),
        ("  #### 68\n\nextra", " 68 ", 1),
        ("24+72=96; 96-28=68. #### 69", "68", 0),
        ("24+72=96; 96-28=68.", "68", 0),  # no final answer
        ("#### sixty-eight", "68", 0),
        ("####", "68", 0),
        ("", "68", 0),
        ("#### -68", "68", 0),
        ("#### 680", "68", 0),
    ],
)
def test_verifier(response, label, expected):
    assert verify(response, label) == expected


@pytest.mark.parametrize("label", ["", "sixty", "6.5", None, True])
def test_verifier_rejects_bad_labels(label):
    with pytest.raises(ValueError, match="label must be an integer"):
        verify("#### 6", label)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown difficulty 'expert'; valid difficulties: easy, medium, hard"):
        generate_splits("expert", 10, 10, 10)
    with pytest.raises(ValueError, match="unknown task 'gsm8k'; valid tasks: arith"):
        write_task_files(tmp_path, task="gsm8k")
    with pytest.raises(ValueError, match="unknown prompt format 'xml'"):
        write_task_files(tmp_path, prompt_format="xml", n_train=4, n_val=4, n_test=4)
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"n_train must be a positive integer, got {bad}"):
            generate_splits("easy", n_train=bad)
    with pytest.raises(ValueError, match="n_test must be a positive integer"):
        generate_splits("easy", 10, 10, 0)
    assert list(tmp_path.iterdir()) == []


def test_check_split_size():
    assert check_split_size(64, 16, "prompts_train.jsonl") == 4
    assert check_split_size(70, 16, "x") == 4
    with pytest.raises(ValueError, match=r"prompts_val.jsonl has 8 rows, fewer than the batch size 16"):
        check_split_size(8, 16, "prompts_val.jsonl")
    with pytest.raises(ValueError, match="batch size for x must be a positive integer"):
        check_split_size(8, 0, "x")


def test_too_many_problems_for_a_level(monkeypatch):
    tiny = arith_task.Difficulty("tiny", 2, 2, 1, 2, 0.0, 2)
    monkeypatch.setitem(DIFFICULTIES, "tiny", tiny)
    with pytest.raises(ValueError, match="ran out of distinct problems"):
        generate_splits("tiny", 100, 10, 10)


def test_cli_writes_all_files(tmp_path, capsys):
    out = tmp_path / "data"
    argv = [
        "--out",
        str(out),
        "--difficulty",
        "hard",
        "--n-train",
        "12",
        "--n-val",
        "3",
        "--n-test",
        "4",
        "--seed",
        "7",
    ]
    assert arith_task.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "prompts_train.jsonl", "prompts_val.jsonl", "prompts_test.jsonl",
        "sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl", "dpo_val.jsonl", "manifest.json",
    }  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "val": 3, "test": 4}
    assert manifest["difficulty"] == "hard" and manifest["keys"]["label_key"] == "answer"
    rows = [json.loads(line) for line in (out / "prompts_test.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["datasource"] == "arith_hard" for row in rows)
    # Same arguments, same bytes.
    first = {n: (out / n).read_bytes() for n in names}
    arith_task.main(argv)
    assert first == {n: (out / n).read_bytes() for n in names}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--difficulty", "expert"], "invalid choice: 'expert'"),
        (["--task", "gsm8k"], "invalid choice: 'gsm8k'"),
        (["--n-train", "0"], "expected a positive integer, got 0"),
        (["--n-val", "ten"], "expected a positive integer, got 'ten'"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        arith_task.main(["--out", str(tmp_path)] + argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
