"""The built-in reasoning task: multi-step arithmetic with a worked chain of thought.

One problem, as one line of text (question, then the solution the model must write):

    Q: 70-6*3-7*5=? A: 6*3=18; 7*5=35; 70-18=52; 52-35=17. #### 17

Products are worked out first (left to right), then the additions and
subtractions left to right, one step per operator, each step using the
previous result. No intermediate value is ever negative. The final answer
follows `####` (the GSM8K convention), which is what the verifier reads.

This module is stdlib-only on purpose: `reward_func.py` imports the verifier
from here inside vLLM/Ray workers, and the CLI must start fast.

CLI (writes OpenRLHF-format JSONL files, see `write_task_files`):

    python -m tsdkd_plugin.toy.arith_task --out DIR --difficulty easy \
        --n-train 2000 --n-val 200 --n-test 500 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TASK_NAMES = ("arith",)
SPLIT_NAMES = ("train", "val", "test")
PROMPT_FORMATS = ("chat", "text")

# Keys of the JSONL files, i.e. the values to pass as --data.input_key etc.
PROMPT_KEY = "prompt"
LABEL_KEY = "answer"
SFT_OUTPUT_KEY = "response"
CHOSEN_KEY = "chosen"
REJECTED_KEY = "rejected"

# A problem's split is a function of its text alone (a hash), never of the
# requested sizes: asking for more training data never moves a problem into or
# out of the test set, and no text can land in two splits.
_SPLIT_BUCKETS = (("train", 0.8), ("val", 0.9), ("test", 1.0))

FINAL_ANSWER_MARKER = "####"
# The integer right after the first `####`; thousands separators tolerated.
_FINAL_ANSWER_RE = re.compile(r"####\s*(-?\d[\d,]*)")


@dataclass(frozen=True)
class Difficulty:
    """How problems of one level are drawn."""

    name: str
    min_ops: int
    max_ops: int
    max_operand: int  # stand-alone operands are drawn from [0, max_operand]
    max_factor: int  # both factors of a product are drawn from [2, max_factor]
    mul_prob: float  # chance that an operator slot is `*` (never two in a row)
    max_value: int  # cap on every intermediate result, hence on the answer


DIFFICULTIES: dict[str, Difficulty] = {
    # Calibrated on these CPUs (docs/toy_task.md): a 1M-parameter teacher
    # reaches ~76% in 5 min of SFT, a 0.13M student ~33% in 2 min.
    "easy": Difficulty("easy", 2, 4, 99, 9, 0.2, 99),
    # The same shapes without the two-digit cap (carries into the hundreds).
    "medium": Difficulty("medium", 2, 4, 99, 9, 0.2, 999),
    # Longer chains, three-digit operands, times tables to 12.
    "hard": Difficulty("hard", 4, 6, 999, 12, 0.3, 9999),
}


@dataclass(frozen=True)
class ArithProblem:
    expression: str  # e.g. "70-6*3-7*5"
    steps: tuple[str, ...]  # e.g. ("6*3=18", "7*5=35", "70-18=52", "52-35=17")
    answer: int
    difficulty: str

    @property
    def num_ops(self) -> int:
        return len(self.steps)

    @property
    def question(self) -> str:
        return f"Q: {self.expression}=?"

    @property
    def solution(self) -> str:
        return format_solution(self.steps, self.answer)

    @property
    def text(self) -> str:
        """The whole problem on one line, as in the calibration runs."""
        return f"{self.question} A: {self.solution}"


def format_solution(steps: Sequence[str], answer: int) -> str:
    return "; ".join(steps) + f". {FINAL_ANSWER_MARKER} {answer}"


# --------------------------------------------------------------------------- names


def get_difficulty(name: str) -> Difficulty:
    try:
        return DIFFICULTIES[name]
    except KeyError:
        raise ValueError(f"unknown difficulty {name!r}; valid difficulties: {', '.join(DIFFICULTIES)}") from None


def check_task_name(name: str) -> str:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return name


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_split_size(n_rows: int, batch_size: int, name: str) -> int:
    """Fail early, with a message naming the split, when it cannot fill one batch.

    Returns the number of full batches. A split smaller than the batch size
    makes OpenRLHF's dataloaders (drop_last=True) yield nothing, and training
    then "finishes" without a single step.
    """
    _check_positive(batch_size, f"batch size for {name}")
    if n_rows < batch_size:
        raise ValueError(
            f"{name} has {n_rows} rows, fewer than the batch size {batch_size}: not one batch can be formed. "
            f"Generate more rows or lower the batch size."
        )
    return n_rows // batch_size


# --------------------------------------------------------------------------- generation


def _draw_operator_slots(rng: random.Random, level: Difficulty) -> list[str]:
    n_ops = rng.randint(level.min_ops, level.max_ops)
    slots: list[str] = []
    for _ in range(n_ops):
        # No `a*b*c`: every product has exactly two single factors, so one step
        # computes it and the step format stays `x*y=z`.
        if (not slots or slots[-1] != "*") and rng.random() < level.mul_prob:
            slots.append("*")
        else:
            slots.append(rng.choice("+-"))
    return slots


def _try_draw_problem(rng: random.Random, level: Difficulty) -> ArithProblem | None:
    """One attempt; None when the drawn shape cannot be filled without a negative or over-cap value."""
    slots = _draw_operator_slots(rng, level)
    # Group operands into terms: a term is one operand, or two joined by `*`.
    # term_signs[i] is the additive operator before term i (None for the first).
    term_sizes: list[int] = [1]
    term_signs: list[str | None] = [None]
    for op in slots:
        if op == "*":
            term_sizes[-1] += 1
        else:
            term_sizes.append(1)
            term_signs.append(op)

    # Factors first, so each product's value is known while the sum chain is drawn.
    factors: list[tuple[int, int] | None] = []
    for size in term_sizes:
        if size == 2:
            factors.append((rng.randint(2, level.max_factor), rng.randint(2, level.max_factor)))
        else:
            factors.append(None)
    if any(f is not None and f[0] * f[1] > level.max_value for f in factors):
        return None

    # Stand-alone operands are drawn given the running value, so that chains
    # with several subtractions stay non-negative without heavy rejection.
    term_values: list[int] = []
    operand_text: list[str] = []
    running = 0
    for i, (sign, pair) in enumerate(zip(term_signs, factors, strict=True)):
        if pair is not None:
            value = pair[0] * pair[1]
            text = f"{pair[0]}*{pair[1]}"
        else:
            if sign == "-":
                high = min(level.max_operand, running)
            else:
                high = min(level.max_operand, level.max_value - running)
            if high < 0:
                return None
            value = rng.randint(0, high)
            text = str(value)
        if i == 0:
            running = value
        elif sign == "+":
            running += value
        else:
            running -= value
        if running < 0 or running > level.max_value:
            return None
        term_values.append(value)
        operand_text.append(text)

    expression = operand_text[0] + "".join(
        f"{sign}{text}" for sign, text in zip(term_signs[1:], operand_text[1:], strict=True)
    )
    steps, answer = _work_steps(factors, term_signs, term_values)
    return ArithProblem(expression=expression, steps=tuple(steps), answer=answer, difficulty=level.name)


def _work_steps(
    factors: Sequence[tuple[int, int] | None],
    term_signs: Sequence[str | None],
    term_values: Sequence[int],
    error_at_step: int | None = None,
    error: int = 0,
) -> tuple[list[str], int]:
    """The worked solution; optionally with `error` added to one step's result
    (and carried through every later step), which is how DPO rejections are made."""
    steps: list[str] = []
    values = list(term_values)
    for i, pair in enumerate(factors):
        if pair is not None:
            result = pair[0] * pair[1] + (error if error_at_step == len(steps) else 0)
            steps.append(f"{pair[0]}*{pair[1]}={result}")
            values[i] = result
    running = values[0]
    for sign, value in zip(term_signs[1:], values[1:], strict=True):
        result = (running + value if sign == "+" else running - value) + (error if error_at_step == len(steps) else 0)
        steps.append(f"{running}{sign}{value}={result}")
        running = result
    return steps, running


def iter_problems(difficulty: str, seed: int) -> Iterator[ArithProblem]:
    """An endless, seeded stream of problems (duplicates possible; callers dedupe)."""
    level = get_difficulty(difficulty)
    # String seeds are hashed with SHA-512 by `random`, identically on every
    # platform and Python version >= 3.2; difficulty is part of the seed so
    # levels do not share a stream.
    rng = random.Random(f"tsdkd-arith:{difficulty}:{seed}")
    while True:
        problem = _try_draw_problem(rng, level)
        if problem is not None:
            yield problem


def split_of(problem_text: str) -> str:
    """The split a problem belongs to, from a hash of its expression text."""
    digest = hashlib.sha256(problem_text.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    for name, upper in _SPLIT_BUCKETS:
        if position < upper:
            return name
    return _SPLIT_BUCKETS[-1][0]


def generate_splits(
    difficulty: str = "easy", n_train: int = 2000, n_val: int = 200, n_test: int = 500, seed: int = 0
) -> dict[str, list[ArithProblem]]:
    """Deterministic, disjoint, duplicate-free splits.

    Each split takes, in stream order, the first problems whose text hashes
    into it, so a split depends only on (difficulty, seed, its own size).
    """
    wanted = {
        "train": _check_positive(n_train, "n_train"),
        "val": _check_positive(n_val, "n_val"),
        "test": _check_positive(n_test, "n_test"),
    }
    get_difficulty(difficulty)
    splits: dict[str, list[ArithProblem]] = {name: [] for name in SPLIT_NAMES}
    seen: set[str] = set()
    # The rarest bucket holds 10% of texts, so ~10x its size in draws fills it;
    # the bound only stops an impossible request (more distinct problems than
    # a level can make) from spinning forever.
    max_draws = 50 * sum(wanted.values()) + 100_000
    for draws, problem in enumerate(iter_problems(difficulty, seed), start=1):
        if problem.expression not in seen:
            seen.add(problem.expression)
            split = split_of(problem.expression)
            bucket = splits[split]
            if len(bucket) < wanted[split]:
                bucket.append(problem)
                if all(len(splits[name]) == wanted[name] for name in SPLIT_NAMES):
                    return splits
        if draws >= max_draws:
            sizes = ", ".join(f"{name} {len(splits[name])}/{wanted[name]}" for name in SPLIT_NAMES)
            raise ValueError(
                f"difficulty {difficulty!r} ran out of distinct problems after {draws} draws ({sizes}); "
                f"request fewer problems or a harder difficulty"
            )
    raise AssertionError("unreachable: iter_problems is endless")


def make_rejected_solution(problem: ArithProblem, seed: int = 0) -> str:
    """A plausible wrong solution: one step is off by a small amount and the error is carried to the end.

    The final answer always differs (every later step adds or subtracts the
    erroneous value once), and no value goes negative.
    """
    factors, term_signs, term_values = _parse_expression(problem.expression)
    rng = random.Random(f"tsdkd-arith-rejected:{seed}:{problem.expression}")
    for _ in range(20):
        step = rng.randrange(problem.num_ops)
        error = rng.choice([-1, 1]) * rng.randint(1, 9)
        steps, answer = _work_steps(factors, term_signs, term_values, step, error)
        if answer != problem.answer and all(_step_result(s) >= 0 for s in steps):
            return format_solution(steps, answer)
    # Adding to the last step can never create a negative value.
    steps, answer = _work_steps(factors, term_signs, term_values, problem.num_ops - 1, rng.randint(1, 9))
    return format_solution(steps, answer)


def _step_result(step: str) -> int:
    return int(step.rsplit("=", 1)[1])


def _parse_expression(expression: str) -> tuple[list, list, list]:
    """Inverse of the generator's grouping: terms, their signs, their values."""
    if not re.fullmatch(r"\d+(?:[-+*]\d+)*", expression):
        raise ValueError(f"not an arithmetic expression of this task: {expression!r}")
    factors: list[tuple[int, int] | None] = []
    term_signs: list[str | None] = []
    term_values: list[int] = []
    for sign, term in re.findall(r"(^|[-+])([\d*]+)", expression):
        numbers = [int(x) for x in term.split("*")]
        if len(numbers) > 2:
            raise ValueError(f"chained products are not part of this task: {expression!r}")
        factors.append((numbers[0], numbers[1]) if len(numbers) == 2 else None)
        term_signs.append(sign or None)
        term_values.append(numbers[0] * numbers[1] if len(numbers) == 2 else numbers[0])
    return factors, term_signs, term_values


# --------------------------------------------------------------------------- verifier


def extract_final_answer(text: str) -> int | None:
    """The integer after the first `####`, or None when there is none.

    Text after the number (an `<|im_end|>`, a repeated answer, rambling) is
    ignored, so a model is judged on the first answer it commits to.
    """
    match = _FINAL_ANSWER_RE.search(text)
    if match is None:
        return None
    return int(match.group(1).replace(",", ""))


def _label_to_int(label) -> int:
    if isinstance(label, bool):
        raise ValueError(f"label must be an integer answer, got {label!r}")
    if isinstance(label, int):
        return label
    text = str(label).strip()
    if not re.fullmatch(r"-?\d+", text):
        # A bad label is a data bug, not a wrong answer: fail loudly.
        raise ValueError(f"label must be an integer answer (as in the {LABEL_KEY!r} key), got {label!r}")
    return int(text)


def verify(response: str, label) -> int:
    """1 if the response's final answer equals the label, else 0 (missing or malformed answer included)."""
    expected = _label_to_int(label)
    got = extract_final_answer(response)
    return int(got is not None and got == expected)


def response_from_query(query: str, prompt: str | None) -> str:
    """The generated part of an OpenRLHF reward query (prompt + response, decoded with special tokens)."""
    if prompt and query.startswith(prompt):
        return query[len(prompt) :]
    # Decoding may not reproduce the prompt byte for byte (e.g. a truncated
    # prompt); the assistant turn marker still delimits the response.
    marker = "<|im_start|>assistant\n"
    if marker in query:
        return query.rsplit(marker, 1)[1]
    # Prompts never contain `####`, so verifying the whole query is still sound.
    return query


# --------------------------------------------------------------------------- OpenRLHF rows


def prompt_value(problem: ArithProblem, prompt_format: str = "chat"):
    """What goes under the `prompt` key.

    chat: a messages list, rendered by the tokenizer's chat template when
          OpenRLHF runs with --data.apply_chat_template.
    text: the raw one-line prompt `Q: ...=? A:` (the calibration format),
          used as-is without --data.apply_chat_template.
    """
    if prompt_format == "chat":
        return [{"role": "user", "content": problem.question}]
    if prompt_format == "text":
        return f"{problem.question} A:"
    raise ValueError(f"unknown prompt format {prompt_format!r}; valid formats: {', '.join(PROMPT_FORMATS)}")


def _completion_value(solution: str, prompt_format: str):
    if prompt_format == "chat":
        return [{"role": "assistant", "content": solution}]
    # Leading space: prompt + completion reproduces `Q: ...=? A: <solution>`.
    return " " + solution


def prompt_row(problem: ArithProblem, prompt_format: str = "chat") -> dict:
    """A row for PromptDataset (on-policy distillation / RL); the label is a string, as HF datasets expect one type."""
    return {
        PROMPT_KEY: prompt_value(problem, prompt_format),
        LABEL_KEY: str(problem.answer),
        # PromptDataset reads `datasource` and OpenRLHF's evaluation reports accuracy per datasource.
        "datasource": f"arith_{problem.difficulty}",
        "num_ops": problem.num_ops,
    }


def sft_row(problem: ArithProblem, prompt_format: str = "chat") -> dict:
    """A row for SFTDataset (openrlhf.cli.train_sft --data.input_key prompt --data.output_key response)."""
    return {
        PROMPT_KEY: prompt_value(problem, prompt_format),
        SFT_OUTPUT_KEY: _completion_value(problem.solution, prompt_format),
        LABEL_KEY: str(problem.answer),
    }


def dpo_row(problem: ArithProblem, prompt_format: str = "chat", seed: int = 0) -> dict:
    """A row for RewardDataset(is_dpo=True): the worked solution against one with a carried slip."""
    return {
        PROMPT_KEY: prompt_value(problem, prompt_format),
        CHOSEN_KEY: _completion_value(problem.solution, prompt_format),
        REJECTED_KEY: _completion_value(make_rejected_solution(problem, seed), prompt_format),
        LABEL_KEY: str(problem.answer),
    }


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """Write rows atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_task_files(
    out_dir: str | os.PathLike,
    *,
    task: str = "arith",
    difficulty: str = "easy",
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    seed: int = 0,
    prompt_format: str = "chat",
) -> dict[str, Path]:
    """Write every file of the task into out_dir and return their paths by name.

    prompts_{train,val,test}.jsonl  prompt + answer (PromptDataset; on-policy KD, RL, evaluation)
    sft_{train,val}.jsonl           prompt + response (SFTDataset; warm-up / off-policy KD)
    dpo_{train,val}.jsonl           prompt + chosen + rejected (RewardDataset, is_dpo=True)
    manifest.json                   the arguments, row counts and file hashes
    """
    check_task_name(task)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; valid formats: {', '.join(PROMPT_FORMATS)}")
    splits = generate_splits(difficulty, n_train, n_val, n_test, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, Path] = {}
    for split in SPLIT_NAMES:
        files[f"prompts_{split}"] = write_jsonl(
            out / f"prompts_{split}.jsonl", [prompt_row(p, prompt_format) for p in splits[split]]
        )
    for split in ("train", "val"):
        files[f"sft_{split}"] = write_jsonl(
            out / f"sft_{split}.jsonl", [sft_row(p, prompt_format) for p in splits[split]]
        )
        files[f"dpo_{split}"] = write_jsonl(
            out / f"dpo_{split}.jsonl", [dpo_row(p, prompt_format, seed) for p in splits[split]]
        )

    manifest = {
        "task": task,
        "difficulty": difficulty,
        "seed": seed,
        "prompt_format": prompt_format,
        "counts": {split: len(splits[split]) for split in SPLIT_NAMES},
        "keys": {
            "input_key": PROMPT_KEY,
            "label_key": LABEL_KEY,
            "output_key": SFT_OUTPUT_KEY,
            "chosen_key": CHOSEN_KEY,
            "rejected_key": REJECTED_KEY,
            "apply_chat_template": prompt_format == "chat",
        },
        "files": {name: {"path": path.name, "sha256": _file_sha256(path)} for name, path in files.items()},
    }
    manifest_path = out / "manifest.json"
    tmp = manifest_path.with_name(f".manifest.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    files["manifest"] = manifest_path
    return files


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tsdkd_plugin.toy.arith_task",
        description="Write the built-in arithmetic reasoning task as OpenRLHF JSONL files.",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--task", default="arith", choices=TASK_NAMES)
    parser.add_argument("--difficulty", default="easy", choices=tuple(DIFFICULTIES))
    parser.add_argument("--n-train", type=_positive_int, default=2000)
    parser.add_argument("--n-val", type=_positive_int, default=200)
    parser.add_argument("--n-test", type=_positive_int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-format",
        default="chat",
        choices=PROMPT_FORMATS,
        help="chat: messages lists (train with --data.apply_chat_template); text: raw `Q: ...=? A:` strings",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    files = write_task_files(
        args.out,
        task=args.task,
        difficulty=args.difficulty,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        prompt_format=args.prompt_format,
    )
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
