"""Prompt datasets (`--data.prompt_dataset`, and `--eval.dataset`), checked before any worker starts.

Every row of a local JSONL/JSON prompt file is checked: OpenRLHF would otherwise fail inside
the trainer actor with a pyarrow/KeyError/Jinja traceback, or silently cut the beginning of an
over-long prompt (docs/reliability.md). Hub datasets, dataset directories and csv/parquet files
are checked on their first rows only (a full scan would download them twice).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.host.preflight.models import looks_local
from tsdkd_plugin.host.preflight.options import prompt_token_budget, require_option

PROMPT_PROBLEMS_NAMED = 3  # bad rows named in the message; the count covers all of them
TOKENIZE_BATCH_ROWS = 2048
# Extensions upstream's blending_datasets loads with load_dataset(<format>, data_files=path): one split, "train".
DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
LOCAL_FILE_SPLIT = "train"


@dataclass(frozen=True)
class DatasetFlags:
    """Which flags name the dataset and its split (the prompt dataset or the evaluation one)."""

    option: str
    split_option: str
    split: str


def prompt_dataset_flags(args: SimpleNamespace) -> DatasetFlags:
    return DatasetFlags("--data.prompt_dataset", "--data.prompt_split", args.data.prompt_split)


def eval_dataset_flags(args: SimpleNamespace) -> DatasetFlags:
    return DatasetFlags("--eval.dataset", "--eval.split", args.eval.split)


def dataset_paths(datasets: str) -> List[str]:
    """The datasets of a (comma-separated) dataset flag, without upstream's `@data_dir`."""
    return [part.split("@")[0].strip() for part in datasets.split(",") if part.strip()]


def _read_json_rows(path: str, flags: DatasetFlags) -> Tuple[List[Tuple[str, object]], List[Tuple[str, str]]]:
    """([(position, row)], [(position, problem)]) for a local .jsonl/.json file; positions are
    "line N" (JSON lines) or "row N" (one JSON array). Raises ArgumentError when the file
    as a whole cannot be read."""
    option = f"{flags.option} {path!r}"
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ArgumentError(f"{option} is not UTF-8 text (byte {error.start}); re-encode it as UTF-8 JSON lines")
    except OSError as error:
        raise ArgumentError(f"{option} cannot be read ({error.strerror}); check the path and its permissions")
    if not text.strip():
        raise ArgumentError(f"{option} has no rows; point it at a file with one JSON object per line")
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ArgumentError(f"{option} is not valid JSON (line {error.lineno}: {error.msg}); fix the file")
        if not data:
            raise ArgumentError(f"{option} has no rows; point it at a non-empty JSON array of objects")
        return [(f"row {i}", row) for i, row in enumerate(data, 1)], []
    rows, problems = [], []  # JSON lines (HF's json loader also reads .json files written that way)
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {line_number}", json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append((f"line {line_number}", f"is not valid JSON ({error.msg})"))
    if not rows and not problems:
        raise ArgumentError(f"{option} has no rows; point it at a file with one JSON object per line")
    return rows, problems


def _prompt_problem(row, input_key: str, label_key: Optional[str]) -> Optional[str]:
    """Why one row cannot become a prompt, or None. Valid prompts: non-empty text, or a
    non-empty list of {"role": str, "content": str | list} messages with some content."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    if input_key not in row:
        return f"has no key {input_key!r} (--data.input_key), only {sorted(row)[:8]}"
    if label_key and row.get(label_key) is None:
        return f"has no value for {label_key!r} (--data.label_key)"
    prompt = row[input_key]
    if isinstance(prompt, str):
        return None if prompt.strip() else "has an empty prompt"
    if isinstance(prompt, list):
        if not prompt:
            return "has an empty message list"
        for index, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), (str, list))):
                return f"has message {index} that is not a {{'role': ..., 'content': ...}} object"
        if not any(str(message["content"]).strip() for message in prompt if message["content"]):
            return "has an empty prompt (every message's content is empty)"
        return None
    kind = "null" if prompt is None else type(prompt).__name__
    return f"has a prompt of type {kind}, not text or a list of chat messages"


def _reference_problem(row, label_key: str) -> Optional[str]:
    """With --tsdkd.on_policy_fraction < 1 the label is a reference response (host/off_policy.py):
    text, or chat messages whose last assistant turn is the response."""
    label = row[label_key]
    if isinstance(label, str) or (isinstance(label, list) and label and isinstance(label[-1], dict)):
        return None
    return (f"has a {label_key!r} (--data.label_key) of type {type(label).__name__}, which is not a reference "
            f"response (text or chat messages) for --tsdkd.on_policy_fraction < 1")


def _describe(problems: List[Tuple[str, str]]) -> str:
    named = "; ".join(f"{where} {what}" for where, what in problems[:PROMPT_PROBLEMS_NAMED])
    return named + ("; ..." if len(problems) > PROMPT_PROBLEMS_NAMED else "")


def _render_prompts(tokenizer, prompts: List, args: SimpleNamespace) -> List[str]:
    """The prompt text OpenRLHF's PromptDataset builds (chat template or --data.input_template)."""
    if args.data.apply_chat_template:
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    if args.data.input_template:
        return [args.data.input_template.format(p) for p in prompts]
    return list(prompts)


def _prompt_lengths(tokenizer, rows: List[Tuple[str, object]], args: SimpleNamespace):
    """([(position, tokens)], [(position, problem)]): token counts in batches; rows the template
    or tokenizer cannot handle are found one by one within a failing batch."""
    key, lengths, problems = args.data.input_key, [], []

    def measure(batch):
        texts = _render_prompts(tokenizer, [row[key] for _, row in batch], args)
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [(where, len(tokens)) for (where, _), tokens in zip(batch, ids)]

    for start in range(0, len(rows), TOKENIZE_BATCH_ROWS):
        batch = rows[start : start + TOKENIZE_BATCH_ROWS]
        try:
            lengths += measure(batch)
            continue
        except Exception:
            pass
        for item in batch:
            try:
                lengths += measure([item])
            except Exception as error:
                first = (str(error).strip().splitlines() or [""])[0][:120]
                problems.append((item[0], f"cannot be rendered and tokenized ({type(error).__name__}: {first})"))
    return lengths, problems


def check_local_prompt_file(path: str, args: SimpleNamespace, tokenizer, flags: DatasetFlags) -> int:
    """Every row OpenRLHF will use (the first --data.max_samples) is valid and fits; JSON is
    valid on every line (the loader parses the whole file). Returns the number of rows used."""
    option = f"{flags.option} {path!r}"
    rows, problems = _read_json_rows(path, flags)
    total_rows = len(rows) + len(problems)
    used = rows[: args.data.max_samples]
    references = args.data.label_key and args.tsdkd.on_policy_fraction < 1.0 and flags.option == "--data.prompt_dataset"
    kinds = {}
    for where, row in used:
        problem = _prompt_problem(row, args.data.input_key, args.data.label_key)
        if problem is None and references:
            problem = _reference_problem(row, args.data.label_key)
        if problem:
            problems.append((where, problem))
        else:
            kinds.setdefault(type(row[args.data.input_key]).__name__, where)
    for where, row in rows[args.data.max_samples :]:
        if not isinstance(row, dict):
            problems.append((where, f"is a JSON {type(row).__name__}, not an object"))
    if problems:
        problems.sort(key=lambda item: int(item[0].split()[1]))
        raise ArgumentError(
            f"{option} has {len(problems)} unusable row(s) of {total_rows} ({_describe(problems)}); fix or remove them"
        )
    if len(kinds) > 1:
        raise ArgumentError(
            f"{option} mixes text prompts ({kinds['str']}) and chat-message lists ({kinds['list']}); "
            f"the dataset loader needs one form per file: convert one of them"
        )
    if "list" in kinds and not args.data.apply_chat_template:
        raise ArgumentError(
            f"{option} holds chat-message lists ({kinds['list']}) but --data.apply_chat_template is off; add the flag"
        )
    if args.data.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ArgumentError(
            f"--data.apply_chat_template is set but the tokenizer of --actor.model_name_or_path "
            f"{args.actor.model_name_or_path!r} has no chat template; drop the flag or use a chat model's tokenizer"
        )
    lengths, problems = _prompt_lengths(tokenizer, used, args)
    if problems:
        raise ArgumentError(
            f"{option} has {len(problems)} row(s) that cannot become prompts ({_describe(problems)}); "
            f"fix or remove them"
        )
    budget = prompt_token_budget(args)
    too_long = [(where, n) for where, n in lengths if n > budget]
    if too_long:
        longest = max(n for _, n in too_long)
        named = [(where, f"has {n} tokens") for where, n in too_long]
        needed = longest + (args.rollout.max_new_tokens or 1)
        raise ArgumentError(
            f"{option} has {len(too_long)} prompt(s) longer than the {budget} tokens that --data.max_len "
            f"{args.data.max_len} leaves after --rollout.max_new_tokens {args.rollout.max_new_tokens} "
            f"({_describe(named)}; counted with the chat template); OpenRLHF would cut their beginning: "
            f"raise --data.max_len to at least {needed} or shorten or remove those rows"
        )
    return len(used)


def _first_rows(dataset: str, flags: DatasetFlags, count: int = 3) -> List[Dict]:
    """A few rows of a dataset directory, a csv/parquet file or a hub dataset, read the way
    OpenRLHF will (only these are checked: a full scan would download the whole dataset twice)."""
    if looks_local(dataset) and not os.path.exists(dataset):
        raise ArgumentError(f"{flags.option} {dataset!r} does not exist; check the path")
    import datasets

    try:
        if os.path.isdir(dataset):
            try:
                data = datasets.load_from_disk(dataset)
            except FileNotFoundError:
                pass  # not a save_to_disk directory: a directory of data files, as upstream falls back
            else:
                if isinstance(data, datasets.DatasetDict):
                    if flags.split not in data:
                        raise ArgumentError(
                            f"{flags.option} {dataset!r} has no split {flags.split!r} ({flags.split_option}); it has "
                            f"{', '.join(data)}"
                        )
                    data = data[flags.split]
                return [data[i] for i in range(min(count, len(data)))]
        extension = os.path.splitext(dataset)[1].lower().lstrip(".")
        if extension in ("csv", "parquet", "arrow"):
            stream = datasets.load_dataset(extension, data_files=dataset, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(dataset, split=flags.split, streaming=True)
        return [row for _, row in zip(range(count), stream)]
    except ArgumentError:
        raise
    except Exception as error:  # hub errors, offline mode, unknown split, unreadable files
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArgumentError(
            f"{flags.option} {dataset!r} cannot be read ({type(error).__name__}: {first}); check the name "
            f"or path, {flags.split_option} {flags.split!r}, and network access for hub datasets"
        ) from None


def check_dataset(args: SimpleNamespace, tokenizer, datasets_flag: str, flags: DatasetFlags) -> Optional[int]:
    """The datasets of one flag; returns how many prompts they give when every one is a local
    file (None when a hub dataset or a directory makes that unknown here)."""
    require_option(flags.option, datasets_flag)
    total: Optional[int] = 0
    for path in dataset_paths(datasets_flag):
        is_data_file = os.path.isfile(path) and path.lower().endswith(DATA_FILE_EXTENSIONS)
        if is_data_file and flags.split != LOCAL_FILE_SPLIT:
            raise ArgumentError(
                f"{flags.split_option} {flags.split!r}: {flags.option} {path!r} is a local data file, whose only split "
                f"is {LOCAL_FILE_SPLIT!r}; drop {flags.split_option} or name a file per split"
            )
        if is_data_file and path.lower().endswith((".jsonl", ".json")):
            used = check_local_prompt_file(path, args, tokenizer, flags)
            total = None if total is None else total + used
            continue
        total = None
        rows = _first_rows(path, flags)
        if not rows:
            raise ArgumentError(f"{flags.option} {path!r} has no rows in split {flags.split!r}")
        problems = [(f"row {i}", p) for i, row in enumerate(rows, 1)
                    if (p := _prompt_problem(row, args.data.input_key, args.data.label_key))]
        if problems:
            raise ArgumentError(
                f"{flags.option} {path!r}: {_describe(problems)}; fix the dataset or the key flags"
            )
    return total


def check_enough_prompts(args: SimpleNamespace, prompts: Optional[int]) -> None:
    """A dataset smaller than one optimizer step trains nothing (upstream's max_steps would be 0)."""
    if prompts is None or args.data.prompt_probs:
        return
    samples = prompts * args.rollout.n_samples_per_prompt
    if samples < args.train.batch_size:
        raise ArgumentError(
            f"--data.prompt_dataset gives {prompts} prompt(s) (at most --data.max_samples {args.data.max_samples}) x "
            f"--rollout.n_samples_per_prompt {args.rollout.n_samples_per_prompt} = {samples} samples per episode, "
            f"fewer than --train.batch_size {args.train.batch_size}: no optimizer step would run; use more prompts "
            f"or a smaller --train.batch_size"
        )


def check_datasets(args: SimpleNamespace, tokenizer) -> Optional[int]:
    """The prompt dataset (and the evaluation dataset, if any); returns the number of prompts when known."""
    prompts = check_dataset(args, tokenizer, args.data.prompt_dataset, prompt_dataset_flags(args))
    check_enough_prompts(args, prompts)
    if args.eval.dataset:
        check_dataset(args, tokenizer, args.eval.dataset, eval_dataset_flags(args))
    return prompts
