"""lm_eval task definitions for local JSONL files: offline checks and benchmarks of your own.

lm_eval reads a task from a YAML file in a directory passed as --include-path; these commands
write such a file next to nothing but your data (no hub access at evaluation time):

    # question/answer rows, answers graded like GSM8K (the number after ####, else the last number)
    python -m tsdkd_plugin.recipes_tools.local_tasks generation --name my_math \\
        --data data/my_math.jsonl --question-key question --answer-key answer --out-dir tasks/
    # multiple choice rows: question, list of choices, index of the right one
    python -m tsdkd_plugin.recipes_tools.local_tasks multiple-choice --name my_quiz \\
        --data data/my_quiz.jsonl --out-dir tasks/
    # the built-in arithmetic task's test split (python -m tsdkd_plugin.toy.arith_task --out data/arith),
    # whose prompts are chat messages: the question is the user turn's text
    python -m tsdkd_plugin.recipes_tools.local_tasks generation --name tsdkd_arith \\
        --data data/arith/prompts_test.jsonl --question-key prompt --prompt-template '{{prompt[0].content}}' \\
        --max-gen-toks 96 --out-dir tasks/

then `python -m tsdkd_plugin.recipes_tools.evaluate --include-path tasks/ --benchmarks my_math ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

# GSM8K's grading, written for these files: exact match after removing commas, dollar signs and a
# trailing period; "strict" reads the number after ####, "flexible" the last number in the answer.
_EXACT_MATCH = {
    "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
    "ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
_NUMBER_FILTERS = [
    {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                        {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                             "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                            {"function": "take_first"}]},
]


def _check_rows(data: Path, keys: List[str]) -> int:
    if not data.is_file():
        raise ValueError(f"{data} does not exist")
    count = 0
    with open(data, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{data} line {line_number} is not valid JSON ({error.msg})") from None
            missing = [key for key in keys if key not in row]
            if missing:
                raise ValueError(f"{data} line {line_number} has no key(s) {', '.join(missing)}; keys: {sorted(row)}")
            count += 1
    if not count:
        raise ValueError(f"{data} has no rows")
    return count


def _write_task(config: dict, out_dir: Path) -> Path:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{config['task']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _local_dataset(data: Path) -> dict:
    # lm_eval hands dataset_path/dataset_kwargs to datasets.load_dataset: the "json" builder reads
    # local files, so nothing is fetched.
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test"}


def generation_task(name: str, data: Path, question_key: str = "question", answer_key: str = "answer",
                    prompt_template: Optional[str] = None, max_gen_toks: Optional[int] = None) -> dict:
    """A generate_until task graded like GSM8K (answer: a number, possibly after ####)."""
    template = prompt_template or ("Question: {{" + question_key + "}}\nAnswer:")
    generation = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0}
    if max_gen_toks:
        generation["max_gen_toks"] = max_gen_toks
    return {
        "task": name, **_local_dataset(data), "output_type": "generate_until",
        "doc_to_text": template, "doc_to_target": "{{" + answer_key + "}}",
        "generation_kwargs": generation, "metric_list": [_EXACT_MATCH], "filter_list": _NUMBER_FILTERS,
        "num_fewshot": 0, "metadata": {"version": 1.0, "source": str(data.resolve())},
    }


def multiple_choice_task(name: str, data: Path, question_key: str = "question", choices_key: str = "choices",
                         label_key: str = "label") -> dict:
    """A log-likelihood multiple-choice task (acc and length-normalized acc)."""
    return {
        "task": name, **_local_dataset(data), "output_type": "multiple_choice",
        "doc_to_text": "Question: {{" + question_key + "}}\nAnswer:",
        "doc_to_choice": "{{" + choices_key + "}}", "doc_to_target": "{{" + label_key + "}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0, "metadata": {"version": 1.0, "source": str(data.resolve())},
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsdkd_plugin.recipes_tools.local_tasks",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generation = commands.add_parser("generation", help="question/answer JSONL, graded like GSM8K")
    generation.add_argument("--question-key", default="question")
    generation.add_argument("--answer-key", default="answer")
    generation.add_argument("--prompt-template", default=None,
                            help="Jinja template of the prompt (default: 'Question: {{QUESTION_KEY}}\\nAnswer:')")
    generation.add_argument("--max-gen-toks", type=int, default=None, help="new tokens per answer (the task's own)")
    choice = commands.add_parser("multiple-choice", help="question/choices/label JSONL, log-likelihood accuracy")
    choice.add_argument("--question-key", default="question")
    choice.add_argument("--choices-key", default="choices")
    choice.add_argument("--label-key", default="label", help="index of the right choice")
    for sub in (generation, choice):
        sub.add_argument("--name", required=True, help="task name (what --benchmarks takes)")
        sub.add_argument("--data", required=True, help="local JSONL file")
    for sub in (generation, choice):
        sub.add_argument("--out-dir", required=True, help="directory to pass to evaluate --include-path")
    options = parser.parse_args(argv)
    out_dir = Path(options.out_dir)
    try:
        if options.command == "generation":
            data = Path(options.data)
            _check_rows(data, [options.question_key, options.answer_key])
            task = generation_task(options.name, data, options.question_key, options.answer_key,
                                   options.prompt_template, options.max_gen_toks)
            path = _write_task(task, out_dir)
        else:
            data = Path(options.data)
            _check_rows(data, [options.question_key, options.choices_key, options.label_key])
            path = _write_task(multiple_choice_task(options.name, data, options.question_key, options.choices_key,
                                                    options.label_key), out_dir)
    except ValueError as error:
        print(f"local_tasks: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
