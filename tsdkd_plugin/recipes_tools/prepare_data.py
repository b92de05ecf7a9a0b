"""Training data for the recipes: OpenRLHF prompt files and DPO preference pairs.

Prompts (TSD-KD, GRPO) from the reference prompt set or any instruction dataset:

    python -m tsdkd_plugin.recipes_tools.prepare_data prompts --out data/tsdkd_prompts.jsonl
    python -m tsdkd_plugin.recipes_tools.prepare_data prompts --dataset ./my.jsonl \\
        --instruction-key question --response-key solution --out data/prompts.jsonl

  --dataset is a HF hub name (default: Minsang/TSD-KD-Qwen2.5-1.5B-Instruct-Gen, columns
  instruction/response), a local .jsonl/.json/.parquet/.csv file, or a directory (saved with
  `datasets.save_to_disk`, or data files). Each output row is

    {"prompt": [{"role": "user", "content": ...}], "response": "...", "label": "..."}

  `prompt` is a chat messages list for `--data.input_key prompt --data.apply_chat_template`;
  `response` is the dataset's reference response (the off-policy fraction trains on it);
  `label` is the final answer that the GRPO verifier checks (`--data.label_key label`), with
  `label_source` saying where it came from. A held-out slice can be written with --eval-out.

Labels for GRPO (a reference answer that is not the student's own), on `prompts` or, to label the
TSD-KD prompt file itself (the same prompts for both runs), on

    python -m tsdkd_plugin.recipes_tools.prepare_data labels --prompts data/tsdkd_prompts.jsonl \\
        --ground-truth openbmb/UltraInteract_sft --teacher-answers gen/teacher_answers.jsonl \\
        --require-label --out data/grpo_prompts.jsonl

from the first of these sources that has an answer:

    --label-key COL            ground truth in the dataset itself (GSM8K `answer`, MATH `solution`)
    --ground-truth DATASET     ground truth joined by instruction (the TSD-KD prompts come from
                               UltraInteract-SFT: openbmb/UltraInteract_sft, whose responses are
                               verified; --ground-truth-instruction-key / --ground-truth-response-key)
    --teacher-answers FILE     the teacher's final answer (a generation file from
                               `python -m tsdkd_plugin.recipes_tools.sampling --model TEACHER ...`),
                               joined by prompt, for rows without ground truth
    --label-from-response      the dataset's own response column, only where it is ground truth:
                               refused on the reference prompt set, whose responses the student wrote

  Answers are taken from whole responses only when stated (\\boxed{}, `#### n`, "the answer is"),
  never from a stray last number; ground-truth responses of one instruction that disagree give no
  label. `label_source` is "ground_truth" or "teacher", and the summary line counts each source.

DPO pairs (DPO baseline), from generation files (JSONL; keys configurable):

    # teacher's response chosen, student's rejected, matched by prompt
    python -m tsdkd_plugin.recipes_tools.prepare_data dpo-pairs --mode teacher-vs-student \\
        --teacher-file gen/teacher.jsonl --student-file gen/student.jsonl --out data/dpo_pairs.jsonl
    # n student samples per prompt scored by the teacher: best chosen, worst rejected
    python -m tsdkd_plugin.recipes_tools.prepare_data dpo-pairs --mode teacher-ranked \\
        --samples-file gen/student_scored.jsonl --out data/dpo_pairs.jsonl

  Output rows: {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant
  message]} for train_dpo's `--data.prompt_key prompt --data.chosen_key chosen
  --data.rejected_key rejected --data.apply_chat_template`.

Every run prints a one-line summary (rows read, written, and why any were skipped) to stderr.
A bad input stops with one sentence naming the file, key or option (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

REFERENCE_PROMPT_SET = "Minsang/TSD-KD-Qwen2.5-1.5B-Instruct-Gen"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """Input data or options are wrong; the message names the file, key or option."""


@dataclass
class Summary:
    """What happened to the input rows, for the one-line report."""

    read: int = 0
    written: int = 0
    held_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)  # label source -> rows labelled from it

    def line(self, what: str, out: str) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        held = f" (+{self.held_out} held out)" if self.held_out else ""
        labels = ", ".join(f"{count} from {source}" for source, count in self.labels.most_common())
        return (f"{what}: read {self.read} rows, wrote {self.written} to {out}{held}"
                + (f"; labels: {labels}" if labels else "") + (f"; skipped {reasons}" if reasons else ""))


# --------------------------------------------------------------------------- loading


def load_rows(source: str, split: str = "train", config: Optional[str] = None) -> Iterator[dict]:
    """Rows of a local file or directory, or of a HF hub dataset (the real loading path)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path)
            return
        if path.suffix not in LOCAL_FORMATS:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
        import datasets

        yield from datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        return
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            loaded = datasets.load_dataset(str(path), split=split)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r}; available: {', '.join(loaded)} (--split)")
            loaded = loaded[split]
        yield from loaded
        return
    if source.startswith(("/", "./", "../", "~")):
        raise DataError(f"{source} does not exist")
    try:
        yield from datasets.load_dataset(source, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(f"could not load dataset {source!r} (split {split!r}) from the hub or a local path: {error}") from None


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_number} is not a JSON object")
            yield row


def write_jsonl(rows: Iterable[dict], out: str) -> int:
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    # Written to a temporary name first: a failed run never leaves a half file under the real name.
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    with open(tmp_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp_path, out_path)
    return count


def _require_key(row: dict, key: str, source: str, option: str) -> None:
    if key not in row:
        raise DataError(f"{source}: rows have no key {key!r} ({option}); available keys: {sorted(row)}")


# --------------------------------------------------------------------------- prompts


def user_messages(instruction: str, system_prompt: Optional[str] = None, suffix: str = "") -> List[Dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": instruction + suffix})
    return messages


def _instruction_identity(instruction: str) -> str:
    """Join key of an instruction across datasets: its words, whitespace normalized."""
    return " ".join(instruction.split())


@dataclass
class LabelSources:
    """Where prompt_rows takes labels from, in order (the first that has an answer wins)."""

    label_key: Optional[str] = None  # ground-truth column of the dataset itself
    from_response: bool = False  # the dataset's response column, when it is ground truth
    ground_truth: Optional[Dict[str, Optional[str]]] = None  # instruction identity -> answer (None: ambiguous)
    ground_truth_name: str = ""
    teacher: Optional[Dict[str, str]] = None  # prompt identity -> the teacher's final answer
    teacher_name: str = ""

    @property
    def wanted(self) -> bool:
        return bool(self.label_key or self.from_response or self.ground_truth is not None or self.teacher is not None)

    def label(self, row: dict, instruction: str, messages, response) -> tuple:
        """(answer, "ground_truth" | "teacher", description of the source) or (None, None, None)."""
        from tsdkd_plugin.recipes_tools.math_answers import extract_final_answer, reference_answer

        candidates = []
        if self.label_key:
            candidates.append((lambda: reference_answer(row.get(self.label_key)), "ground_truth",
                               f"ground truth (column {self.label_key!r})"))
        if self.from_response:
            candidates.append((lambda: extract_final_answer(response, strict=True) if isinstance(response, str) else None,
                               "ground_truth", "ground truth (the dataset's responses)"))
        if self.ground_truth is not None:
            candidates.append((lambda: self.ground_truth.get(_instruction_identity(instruction)), "ground_truth",
                               f"ground truth ({self.ground_truth_name})"))
        if self.teacher is not None:
            candidates.append((lambda: self.teacher.get(_prompt_identity(messages)), "teacher",
                               f"teacher answers ({self.teacher_name})"))
        for answer_of, kind, description in candidates:
            answer = answer_of()
            if answer:
                return answer, kind, description
        return None, None, None


def ground_truth_answers(rows: Iterable[dict], source: str, instruction_key: str, response_key: str,
                         summary: Summary) -> Dict[str, Optional[str]]:
    """instruction identity -> the final answer its ground-truth responses state (None when two of
    them state different answers: no label rather than a coin toss)."""
    from tsdkd_plugin.recipes_tools.math_answers import answers_match, extract_final_answer

    answers: Dict[str, Optional[str]] = {}
    for index, row in enumerate(rows):
        if index == 0:
            _require_key(row, instruction_key, source, "--ground-truth-instruction-key")
            _require_key(row, response_key, source, "--ground-truth-response-key")
        instruction, response = row.get(instruction_key), row.get(response_key)
        if not isinstance(instruction, str) or not isinstance(response, str):
            continue
        answer = extract_final_answer(response, strict=True)
        if answer is None:
            continue
        key = _instruction_identity(instruction)
        if key not in answers:
            answers[key] = answer
        elif answers[key] is not None and not answers_match(answers[key], answer):
            answers[key] = None
    ambiguous = sum(answer is None for answer in answers.values())
    if ambiguous:
        summary.skipped[f"ground-truth instructions with conflicting answers in {source}"] += ambiguous
    return answers


def teacher_final_answers(rows: Iterable[dict], source: str, prompt_key: str = "prompt") -> Dict[str, str]:
    """prompt identity -> the final answer stated in the teacher's (first) response."""
    from tsdkd_plugin.recipes_tools.math_answers import extract_final_answer

    answers = {}
    for index, row in enumerate(rows):
        if index == 0:
            _require_key(row, prompt_key, source, "the prompt column")
            if "responses" not in row and "response" not in row:
                raise DataError(f"{source}: rows have neither 'responses' nor 'response'; available keys: {sorted(row)}")
        responses = row.get("responses", [row.get("response")])
        response = responses[0] if isinstance(responses, list) and responses else None
        answer = extract_final_answer(response, strict=True) if isinstance(response, str) else None
        if answer:
            answers[_prompt_identity(_prompt_messages(row[prompt_key], source))] = answer
    return answers


def prompt_rows(
    rows: Iterable[dict],
    source: str,
    summary: Summary,
    instruction_key: str = "instruction",
    response_key: Optional[str] = "response",
    labels: Optional[LabelSources] = None,
    require_label: bool = False,
    system_prompt: Optional[str] = None,
    instruction_suffix: str = "",
    dedupe: bool = True,
) -> Iterator[dict]:
    """OpenRLHF prompt rows; see the module docstring for the format."""
    labels = labels or LabelSources()
    seen = set()
    for row in rows:
        summary.read += 1
        if summary.read == 1:  # the schema is checked on the first row, with the keys that exist
            _require_key(row, instruction_key, source, "--instruction-key")
            if response_key:
                _require_key(row, response_key, source, "--response-key (pass --response-key '' for none)")
            if labels.label_key:
                _require_key(row, labels.label_key, source, "--label-key")
        instruction = row.get(instruction_key)
        if not isinstance(instruction, str) or not instruction.strip():
            summary.skipped["empty instructions"] += 1
            continue
        if dedupe:
            if instruction in seen:
                summary.skipped["duplicate instructions"] += 1
                continue
            seen.add(instruction)
        out = {"prompt": user_messages(instruction, system_prompt, instruction_suffix)}
        response = row.get(response_key) if response_key else None
        if response_key:
            out["response"] = response if isinstance(response, str) else ""
        if labels.wanted:
            label, kind, description = labels.label(row, instruction, out["prompt"], response)
            if label is None and require_label:
                summary.skipped["rows without a label"] += 1
                continue
            out["label"], out["label_source"] = label or "", kind or ""
            if description:
                summary.labels[description] += 1
        summary.written += 1
        yield out


def split_holdout(rows: List[dict], eval_rows: int, seed: int):
    if eval_rows <= 0:
        return rows, []
    if eval_rows >= len(rows):
        raise DataError(f"--eval-rows {eval_rows} leaves no training rows (only {len(rows)} prompts)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_rows])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --------------------------------------------------------------------------- DPO pairs


def _prompt_messages(value, source: str) -> List[Dict[str, str]]:
    """A generation file's prompt, as chat messages (a plain string becomes one user turn)."""
    if isinstance(value, str):
        return user_messages(value)
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{source}: a prompt must be a string or a list of {{role, content}} messages, got {value!r:.80}")


def _prompt_identity(messages: List[Dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _assistant(text: str) -> List[Dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _responses_by_prompt(rows: Iterable[dict], source: str, prompt_key: str, response_key: str, summary: Summary):
    """prompt identity -> (messages, [responses]) in file order."""
    grouped: "OrderedDict[str, tuple]" = OrderedDict()
    for index, row in enumerate(rows):
        summary.read += 1
        if index == 0:
            _require_key(row, prompt_key, source, "--prompt-key")
            _require_key(row, response_key, source, "--response-key")
        messages = _prompt_messages(row[prompt_key], source)
        response = row.get(response_key)
        if not isinstance(response, str) or not response.strip():
            summary.skipped[f"empty responses in {Path(source).name}"] += 1
            continue
        grouped.setdefault(_prompt_identity(messages), (messages, []))[1].append(response)
    return grouped


def teacher_vs_student_pairs(
    teacher_rows: Iterable[dict], student_rows: Iterable[dict], teacher_source: str, student_source: str,
    summary: Summary, prompt_key: str = "prompt", response_key: str = "response",
) -> Iterator[dict]:
    """One pair per prompt present in both files: the teacher's (first) response chosen, the
    student's (first) response rejected. Identical responses carry no preference and are skipped."""
    teacher = _responses_by_prompt(teacher_rows, teacher_source, prompt_key, response_key, summary)
    student = _responses_by_prompt(student_rows, student_source, prompt_key, response_key, summary)
    for identity, (messages, teacher_responses) in teacher.items():
        if identity not in student:
            summary.skipped["prompts without a student response"] += 1
            continue
        chosen, rejected = teacher_responses[0], student[identity][1][0]
        if chosen.strip() == rejected.strip():
            summary.skipped["identical teacher and student responses"] += 1
            continue
        summary.written += 1
        yield {"prompt": messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}
    unmatched = len(student.keys() - teacher.keys())
    if unmatched:
        summary.skipped["prompts without a teacher response"] += unmatched


def teacher_ranked_pairs(
    rows: Iterable[dict], source: str, summary: Summary, prompt_key: str = "prompt",
    responses_key: str = "responses", scores_key: str = "scores", min_margin: float = 0.0,
) -> Iterator[dict]:
    """Best vs worst of a prompt's student samples by teacher score.

    Rows are either grouped, {prompt, responses: [...], scores: [...]}, or one sample per row,
    {prompt, response: str, score: float} (then --responses-key response --scores-key score),
    grouped by prompt. Groups with fewer than 2 samples, or whose best and worst scores are
    closer than min_margin (ties included), carry no preference and are skipped.
    """
    groups: "OrderedDict[str, tuple]" = OrderedDict()
    for index, row in enumerate(rows):
        summary.read += 1
        if index == 0:
            for key, option in ((prompt_key, "--prompt-key"), (responses_key, "--responses-key"), (scores_key, "--scores-key")):
                _require_key(row, key, source, option)
        messages = _prompt_messages(row[prompt_key], source)
        responses, scores = row[responses_key], row[scores_key]
        if isinstance(responses, str):
            responses, scores = [responses], [scores]
        if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
            raise DataError(
                f"{source} row {index + 1}: {responses_key!r} and {scores_key!r} must be lists of equal length "
                f"(or a string and a number)"
            )
        for response, score in zip(responses, scores):
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise DataError(f"{source} row {index + 1}: score {score!r} is not a number ({scores_key!r})")
            if isinstance(response, str) and response.strip():
                groups.setdefault(_prompt_identity(messages), (messages, []))[1].append((float(score), response))
            else:
                summary.skipped["empty responses"] += 1
    for messages, samples in groups.values():
        if len(samples) < 2:
            summary.skipped["prompts with fewer than 2 samples"] += 1
            continue
        # Stable: among equal scores the earlier sample wins for chosen, the later for rejected.
        best = max(samples, key=lambda sample: sample[0])
        worst = min(reversed(samples), key=lambda sample: sample[0])
        if best[0] - worst[0] <= min_margin:
            summary.skipped["prompts whose samples the teacher scores alike"] += 1
            continue
        summary.written += 1
        yield {"prompt": messages, "chosen": _assistant(best[1]), "rejected": _assistant(worst[1])}


# --------------------------------------------------------------------------- CLI


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-key", default=None,
                        help="ground-truth column for the GRPO verifier (a GSM8K/MATH solution or a bare answer)")
    parser.add_argument("--ground-truth", default=None,
                        help="dataset with ground-truth responses joined by instruction (e.g. openbmb/UltraInteract_sft)")
    parser.add_argument("--ground-truth-split", default="train")
    parser.add_argument("--ground-truth-instruction-key", default="instruction")
    parser.add_argument("--ground-truth-response-key", default="response")
    parser.add_argument("--teacher-answers", default=None,
                        help="generation file of the teacher (sampling --model TEACHER): labels where ground truth is missing")
    parser.add_argument("--require-label", action="store_true", help="drop rows without a label (the GRPO prompt file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsdkd_plugin.recipes_tools.prepare_data",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prompts = commands.add_parser("prompts", help="instruction dataset -> OpenRLHF prompt JSONL")
    prompts.add_argument("--dataset", default=REFERENCE_PROMPT_SET,
                         help=f"HF hub name, local file or directory (default: {REFERENCE_PROMPT_SET})")
    prompts.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict (default: train)")
    prompts.add_argument("--instruction-key", default="instruction", help="column with the instruction (default: instruction)")
    prompts.add_argument("--response-key", default="response",
                         help="column with the reference response, '' for none (default: response)")
    prompts.add_argument("--dataset-config", default=None, help="config name of a hub dataset (GSM8K: main)")
    add_label_arguments(prompts)
    prompts.add_argument("--label-from-response", action="store_true",
                         help="labels from this dataset's own response column, when it is ground truth "
                              "(refused on the reference set: its responses are the student's)")
    prompts.add_argument("--system-prompt", default=None, help="a system message before each instruction")
    prompts.add_argument("--instruction-suffix", default="",
                         help="text appended to each instruction (e.g. ' /no_think' for Qwen3 without thinking)")
    prompts.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep repeated instructions")
    prompts.add_argument("--max-rows", type=int, default=None, help="keep at most this many prompts (after skipping)")
    prompts.add_argument("--eval-rows", type=int, default=0, help="hold out this many prompts (random, seeded)")
    prompts.add_argument("--eval-out", default=None, help="where the held-out prompts go (needs --eval-rows)")
    prompts.add_argument("--seed", type=int, default=42)
    prompts.add_argument("--out", required=True, help="output JSONL")

    labels = commands.add_parser("labels", help="labels for an existing prompt file (the TSD-KD prompts -> GRPO prompts)")
    labels.add_argument("--prompts", required=True, help="prompt JSONL written by `prompts` (chat messages)")
    labels.add_argument("--input-key", default="prompt", help="chat-message column of --prompts (default: prompt)")
    labels.add_argument("--instruction-suffix", default="",
                        help="the suffix `prompts` appended to each instruction, removed before the ground-truth join")
    add_label_arguments(labels)
    labels.add_argument("--out", required=True, help="output JSONL (the same rows, with label and label_source)")

    pairs = commands.add_parser("dpo-pairs", help="generation files -> DPO preference pairs JSONL")
    pairs.add_argument("--mode", required=True, choices=("teacher-vs-student", "teacher-ranked"))
    pairs.add_argument("--teacher-file", help="teacher generations (teacher-vs-student)")
    pairs.add_argument("--student-file", help="student generations (teacher-vs-student)")
    pairs.add_argument("--samples-file", help="student samples with teacher scores (teacher-ranked)")
    pairs.add_argument("--prompt-key", default="prompt", help="prompt column: a string or chat messages (default: prompt)")
    pairs.add_argument("--response-key", default="response", help="response column (teacher-vs-student; default: response)")
    pairs.add_argument("--responses-key", default="responses",
                       help="samples column, a list or one string per row (teacher-ranked; default: responses)")
    pairs.add_argument("--scores-key", default="scores", help="teacher scores column (teacher-ranked; default: scores)")
    pairs.add_argument("--min-margin", type=float, default=0.0,
                       help="teacher-ranked: skip prompts whose best and worst scores differ by at most this")
    pairs.add_argument("--split", default="train")
    pairs.add_argument("--out", required=True, help="output JSONL")
    return parser


def label_sources(options, summary: Summary) -> LabelSources:
    from_response = getattr(options, "label_from_response", False)
    if from_response:
        if not options.response_key:
            raise DataError("--label-from-response reads the reference response: set --response-key")
        if options.dataset == REFERENCE_PROMPT_SET:
            raise DataError(
                f"--label-from-response on {REFERENCE_PROMPT_SET} would reward agreement with the student's own "
                f"answers (its responses were written by Qwen2.5-1.5B-Instruct); use --ground-truth "
                f"openbmb/UltraInteract_sft and/or --teacher-answers instead")
    sources = LabelSources(label_key=options.label_key, from_response=from_response)
    if options.ground_truth:
        sources.ground_truth = ground_truth_answers(
            load_rows(options.ground_truth, options.ground_truth_split), options.ground_truth,
            options.ground_truth_instruction_key, options.ground_truth_response_key, summary)
        sources.ground_truth_name = options.ground_truth
    if options.teacher_answers:
        sources.teacher = teacher_final_answers(load_rows(options.teacher_answers), options.teacher_answers)
        sources.teacher_name = options.teacher_answers
    return sources


def run_prompts(options) -> Summary:
    if options.eval_out and options.eval_rows <= 0:
        raise DataError("--eval-out needs --eval-rows N > 0")
    summary = Summary()
    labels = label_sources(options, summary)
    if options.require_label and not labels.wanted:
        raise DataError("--require-label needs a label source: --label-key, --ground-truth, --teacher-answers "
                        "or --label-from-response")
    rows = list(prompt_rows(
        load_rows(options.dataset, options.split, options.dataset_config), options.dataset, summary,
        instruction_key=options.instruction_key, response_key=options.response_key or None, labels=labels,
        require_label=options.require_label, system_prompt=options.system_prompt,
        instruction_suffix=options.instruction_suffix, dedupe=options.dedupe,
    ))
    if options.max_rows is not None and len(rows) > options.max_rows:
        summary.skipped["rows over --max-rows"] += len(rows) - options.max_rows
        rows = rows[: options.max_rows]
    if not rows:
        raise DataError(f"{options.dataset}: no usable rows ({summary.line('prompts', options.out)})")
    train, held_out = split_holdout(rows, options.eval_rows, options.seed)
    summary.written = write_jsonl(train, options.out)
    if held_out:
        summary.held_out = write_jsonl(held_out, options.eval_out or str(Path(options.out).with_suffix(".eval.jsonl")))
    return summary


def run_labels(options) -> Summary:
    """The rows of a prompt file with their labels: the same prompts as TSD-KD, for GRPO."""
    summary = Summary()
    labels = label_sources(options, summary)
    if not labels.wanted:
        raise DataError("labels needs a label source: --ground-truth, --teacher-answers or --label-key")
    out_rows = []
    for index, row in enumerate(load_rows(options.prompts)):
        summary.read += 1
        if index == 0:
            _require_key(row, options.input_key, options.prompts, "--input-key")
        messages = _prompt_messages(row[options.input_key], options.prompts)
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        instruction = user_turns[-1] if user_turns else ""
        if options.instruction_suffix and instruction.endswith(options.instruction_suffix):
            instruction = instruction[: -len(options.instruction_suffix)]
        label, kind, description = labels.label(row, instruction, messages, None)
        if label is None and options.require_label:
            summary.skipped["rows without a label"] += 1
            continue
        out_rows.append({**row, "label": label or "", "label_source": kind or ""})
        if description:
            summary.labels[description] += 1
    if not out_rows:
        raise DataError(f"{options.prompts}: no row got a label ({summary.line('labels', options.out)})")
    summary.written = write_jsonl(out_rows, options.out)
    return summary


def run_dpo_pairs(options) -> Summary:
    summary = Summary()
    if options.mode == "teacher-vs-student":
        missing = [flag for flag, value in (("--teacher-file", options.teacher_file), ("--student-file", options.student_file)) if not value]
        if missing:
            raise DataError(f"--mode teacher-vs-student needs {' and '.join(missing)}")
        pairs = teacher_vs_student_pairs(
            load_rows(options.teacher_file, options.split), load_rows(options.student_file, options.split),
            options.teacher_file, options.student_file, summary, options.prompt_key, options.response_key)
    else:
        if not options.samples_file:
            raise DataError("--mode teacher-ranked needs --samples-file")
        pairs = teacher_ranked_pairs(load_rows(options.samples_file, options.split), options.samples_file, summary,
                                     options.prompt_key, options.responses_key, options.scores_key, options.min_margin)
    rows = list(pairs)
    if not rows:
        raise DataError(f"no preference pairs could be formed ({summary.line('dpo-pairs', options.out)})")
    write_jsonl(rows, options.out)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        run = {"prompts": run_prompts, "labels": run_labels, "dpo-pairs": run_dpo_pairs}[options.command]
        summary = run(options)
    except DataError as error:
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    print(summary.line(options.command, options.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
