"""Checks that run before any Ray worker starts, so a wrong launch fails in seconds.

Every failure is an `ArgumentError` whose message is one sentence naming the
option or file and what would be valid. The CLI prints it without a traceback.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.objective import TSDKDConfig

LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def _looks_local(path: str) -> bool:
    return path.startswith(LOCAL_PATH_PREFIXES) or os.path.exists(path)


REQUIRED_OPTION_HINTS = {
    "--actor.model_name_or_path": "the student: a HF model name or a local model directory",
    "--teacher.model_name_or_path": "the teacher: a HF model name or a local model directory using the student's tokenizer",
    "--data.prompt_dataset": "a JSONL file, a dataset directory or a HF dataset name",
}


def require_option(option: str, value) -> None:
    if value in (None, ""):
        raise ArgumentError(f"{option} is required: {REQUIRED_OPTION_HINTS.get(option, 'set it')}")


def check_model_path(option: str, path: Optional[str]) -> None:
    require_option(option, path)
    if _looks_local(path):
        expanded = os.path.expanduser(path)
        if not os.path.isdir(expanded):
            raise ArgumentError(f"{option} {path!r} does not exist or is not a directory")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ArgumentError(f"{option} {path!r} has no config.json; point it at a saved HF model directory")


def shared_vocabulary_size(student_path: str, teacher_path: str) -> int:
    """len(tokenizer) when both models use the same tokenizer, else an ArgumentError.

    Logit rows beyond len(tokenizer) are padding (e.g. 151,936 vs 152,064 for Qwen2.5
    1.5B vs 14B), so distributions are compared on ids [0, len(tokenizer)).
    """
    from transformers import AutoConfig

    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    configs = {}
    for option, path in (("--actor.model_name_or_path", student_path), ("--teacher.model_name_or_path", teacher_path)):
        try:  # a hub name that does not exist (or is not cached offline) fails here with one sentence
            configs[option] = AutoConfig.from_pretrained(path, trust_remote_code=True)
        except (OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise ArgumentError(
                f"{option} {path!r} cannot be loaded ({type(error).__name__}: {first}); check the name or path, "
                f"and network access (or the local cache with HF_HUB_OFFLINE=1) for hub models"
            ) from None
    try:
        shared = check_same_tokenizer(
            teacher_path, student_path,
            f"--teacher.model_name_or_path {teacher_path!r}", f"--actor.model_name_or_path {student_path!r}",
        )
    except ValueError as error:
        raise ArgumentError(f"{error} Pick a teacher from the student's model family.") from None
    for option, path in (("--actor.model_name_or_path", student_path), ("--teacher.model_name_or_path", teacher_path)):
        rows = getattr(configs[option], "vocab_size", None)
        if rows is not None and rows < shared:
            raise ArgumentError(
                f"{option} {path!r} has {rows} logit rows but its tokenizer has {shared} tokens; "
                f"the model and tokenizer do not belong together"
            )
    return shared


# ----------------------------------------------------------------------------- prompt datasets
# Every row of a local JSONL/JSON prompt file is checked before any Ray worker starts
# (docs/reliability.md): OpenRLHF would otherwise fail inside the trainer actor with a
# pyarrow/KeyError/Jinja traceback, or silently cut the beginning of an over-long prompt.

PROMPT_PROBLEMS_NAMED = 3  # bad rows named in the message; the count covers all of them
TOKENIZE_BATCH_ROWS = 2048


def _dataset_paths(prompt_dataset: str) -> List[str]:
    """The datasets of a (comma-separated) --data.prompt_dataset, without upstream's `@data_dir`."""
    return [part.split("@")[0].strip() for part in prompt_dataset.split(",") if part.strip()]


def _read_json_rows(path: str) -> Tuple[List[Tuple[str, object]], List[Tuple[str, str]]]:
    """([(position, row)], [(position, problem)]) for a local .jsonl/.json file; positions are
    "line N" (JSON lines) or "row N" (one JSON array). Raises ArgumentError when the file
    as a whole cannot be read."""
    option = f"--data.prompt_dataset {path!r}"
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


def _describe(problems: List[Tuple[str, str]]) -> str:
    named = "; ".join(f"{where} {what}" for where, what in problems[:PROMPT_PROBLEMS_NAMED])
    return named + ("; ..." if len(problems) > PROMPT_PROBLEMS_NAMED else "")


def _load_prompt_tokenizer(args: SimpleNamespace):
    """The student's tokenizer, loaded as OpenRLHF's trainer loads it (get_tokenizer)."""
    from transformers import AutoTokenizer

    path = args.actor.model_name_or_path
    try:
        use_fast = not args.data.disable_fast_tokenizer
        return AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=use_fast)
    except Exception as error:  # OSError, ValueError, ...: any failure is a bad model input here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArgumentError(
            f"--actor.model_name_or_path {path!r}: its tokenizer cannot be loaded ({type(error).__name__}: {first}); "
            f"point it at a model directory or hub name that includes a tokenizer"
        ) from None


def _render_prompts(tokenizer, prompts: List, args: SimpleNamespace) -> List[str]:
    """The prompt text OpenRLHF's PromptDataset builds (chat template or --data.input_template)."""
    if args.data.apply_chat_template:
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    if args.data.input_template:
        return [args.data.input_template.format(p) for p in prompts]
    return list(prompts)


def prompt_token_budget(args: SimpleNamespace) -> int:
    """Prompt tokens that fit uncut. OpenRLHF's rollout keeps the last max_len - max_new_tokens
    prompt tokens (it drops the beginning of a longer prompt, chat header included); without
    --rollout.max_new_tokens the response gets max_len - prompt tokens, so at least one must remain."""
    max_new = args.rollout.max_new_tokens
    return args.data.max_len - (max_new if max_new is not None else 1)


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


def check_prompt_fits(args: SimpleNamespace) -> None:
    """Flags alone: a response needs room in --data.max_len."""
    max_new = args.rollout.max_new_tokens
    if max_new is not None and max_new < 1:
        raise ArgumentError(f"--rollout.max_new_tokens must be >= 1, got {max_new}")
    if prompt_token_budget(args) < 1:
        raise ArgumentError(
            f"--data.max_len ({args.data.max_len}) leaves no room for a prompt after --rollout.max_new_tokens "
            f"({max_new}); raise --data.max_len above {max_new} or lower --rollout.max_new_tokens"
        )


def check_local_prompt_file(path: str, args: SimpleNamespace, tokenizer_cache: Dict) -> None:
    """Every row OpenRLHF will use (the first --data.max_samples) is valid and fits; JSON is
    valid on every line (the loader parses the whole file)."""
    option = f"--data.prompt_dataset {path!r}"
    rows, problems = _read_json_rows(path)
    total_rows = len(rows) + len(problems)
    used = rows[: args.data.max_samples]
    kinds = {}
    for where, row in used:
        problem = _prompt_problem(row, args.data.input_key, args.data.label_key)
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
    if "tokenizer" not in tokenizer_cache:
        tokenizer_cache["tokenizer"] = _load_prompt_tokenizer(args)
    tokenizer = tokenizer_cache["tokenizer"]
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


def _first_rows(dataset: str, split: str, count: int = 3) -> List[Dict]:
    """A few rows of a dataset directory, a csv/parquet file or a hub dataset, read the way
    OpenRLHF will (only these are checked: a full scan would download the whole dataset twice)."""
    if _looks_local(dataset) and not os.path.exists(dataset):
        raise ArgumentError(f"--data.prompt_dataset {dataset!r} does not exist; check the path")
    import datasets

    try:
        if os.path.isdir(dataset):
            try:
                data = datasets.load_from_disk(dataset)
                data = data[split] if isinstance(data, datasets.DatasetDict) else data
                return [data[i] for i in range(min(count, len(data)))]
            except FileNotFoundError:
                pass  # not a save_to_disk directory: a directory of data files, as upstream falls back
        extension = os.path.splitext(dataset)[1].lower().lstrip(".")
        if extension in ("csv", "parquet", "arrow"):
            stream = datasets.load_dataset(extension, data_files=dataset, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(dataset, split=split, streaming=True)
        return [row for _, row in zip(range(count), stream)]
    except Exception as error:  # hub errors, offline mode, unknown split, unreadable files
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArgumentError(
            f"--data.prompt_dataset {dataset!r} cannot be read ({type(error).__name__}: {first}); check the name "
            f"or path, --data.prompt_split {split!r}, and network access for hub datasets"
        ) from None


def check_prompt_dataset(args: SimpleNamespace) -> None:
    require_option("--data.prompt_dataset", args.data.prompt_dataset)
    check_prompt_fits(args)
    paths = _dataset_paths(args.data.prompt_dataset)
    probabilities = args.data.prompt_probs
    if probabilities and len(probabilities.split(",")) != len(paths):
        raise ArgumentError(
            f"--data.prompt_probs has {len(probabilities.split(','))} value(s) for {len(paths)} dataset(s) in "
            f"--data.prompt_dataset; give one probability per dataset"
        )
    if args.data.input_template and not args.data.apply_chat_template:
        try:
            args.data.input_template.format("x")
        except (IndexError, KeyError, ValueError) as error:
            raise ArgumentError(
                f"--data.input_template {args.data.input_template!r} cannot format a prompt ({type(error).__name__}: "
                f"{error}); it needs exactly one {{}} and other braces doubled"
            ) from None
    tokenizer_cache: Dict = {}
    for path in paths:
        if os.path.isfile(path) and path.lower().endswith((".jsonl", ".json")):
            check_local_prompt_file(path, args, tokenizer_cache)
            continue
        rows = _first_rows(path, args.data.prompt_split)
        if not rows:
            raise ArgumentError(f"--data.prompt_dataset {path!r} has no rows in split {args.data.prompt_split!r}")
        problems = [(f"row {i}", p) for i, row in enumerate(rows, 1)
                    if (p := _prompt_problem(row, args.data.input_key, args.data.label_key))]
        if problems:
            raise ArgumentError(
                f"--data.prompt_dataset {path!r}: {_describe(problems)}; fix the dataset or the key flags"
            )


# ----------------------------------------------------------------------------- checkpoints and run flags

# vLLM 0.29's SamplingParams raises a temperature in (0, 0.01) to 0.01 (with a warning); only 0 is greedy.
VLLM_MIN_TEMPERATURE = 0.01


def check_run_flags(args: SimpleNamespace) -> None:
    """Upstream flags whose bad values fail late (a ZeroDivisionError at the first step, NaN logits)."""
    save_steps = args.ckpt.save_steps
    if save_steps == 0 or save_steps < -1:
        raise ArgumentError(
            f"--ckpt.save_steps must be >= 1 (save every N steps) or -1 (no checkpoints), got {save_steps}"
        )
    if save_steps != -1 and args.ckpt.max_num < 1:
        raise ArgumentError(
            f"--ckpt.max_num must be >= 1 to keep the checkpoints --ckpt.save_steps {save_steps} writes, "
            f"got {args.ckpt.max_num}"
        )
    temperature = args.rollout.temperature
    if not (temperature == 0 or VLLM_MIN_TEMPERATURE <= temperature < float("inf")):
        raise ArgumentError(
            f"--rollout.temperature must be 0 (greedy) or >= {VLLM_MIN_TEMPERATURE:g}, got {temperature:g} "
            f"(vLLM samples any value in (0, {VLLM_MIN_TEMPERATURE:g}) at {VLLM_MIN_TEMPERATURE:g}, not greedily)"
        )


def check_resume_checkpoint(args: SimpleNamespace) -> None:
    """With --ckpt.load_enable, the checkpoint `latest` names must be loadable (or absent:
    then training starts at step 0), instead of failing deep inside DeepSpeed's load."""
    if not args.ckpt.load_enable:
        return
    from tsdkd_plugin.host.checkpoint import actor_checkpoint_dir, checkpoint_problem

    if os.path.exists(args.ckpt.path) and not os.path.isdir(args.ckpt.path):
        raise ArgumentError(f"--ckpt.path {args.ckpt.path!r} is a file, not a checkpoint directory; point it elsewhere")
    problem = checkpoint_problem(actor_checkpoint_dir(args.ckpt.path))
    if problem:
        raise ArgumentError(f"--ckpt.load_enable: {problem}")


def check_objective_vs_rollout(args: SimpleNamespace, config: TSDKDConfig) -> None:
    n = args.rollout.n_samples_per_prompt
    if config.sequence_level_on:
        if n < 2:
            raise ArgumentError(
                f"--tsdkd.indirect_level {config.indirect_level!r} ranks a prompt's candidates, which needs "
                f"--rollout.n_samples_per_prompt >= 2 (got {n}); or use --tsdkd.indirect_level token"
            )
        for option, value in (("--rollout.micro_batch_size", args.rollout.micro_batch_size),
                              ("--train.micro_batch_size", args.train.micro_batch_size)):
            if value % n:
                raise ArgumentError(
                    f"{option} ({value}) must be a multiple of --rollout.n_samples_per_prompt ({n}) so a prompt's "
                    f"candidates stay in one micro-batch for sequence-level ranking"
                )
    if not 0.0 <= args.tsdkd.on_policy_fraction <= 1.0:
        raise ArgumentError(f"--tsdkd.on_policy_fraction must be in [0, 1], got {args.tsdkd.on_policy_fraction}")
    if args.tsdkd.on_policy_fraction < 1.0 and not args.data.label_key:
        raise ArgumentError(
            "--tsdkd.on_policy_fraction < 1 trains some steps on the dataset's reference responses: set "
            "--data.label_key to the response column"
        )
    if not args.vllm.num_engines or args.vllm.num_engines < 1:
        raise ArgumentError("--vllm.num_engines must be >= 1: TSD-KD samples the student's candidates with vLLM")
    if args.train.dynamic_batch_enable:
        raise ArgumentError("--train.dynamic_batch_enable is not supported by TSD-KD yet (teacher signals are batched per micro-batch)")
    if args.ds.lora.rank < 0:
        raise ArgumentError(f"--ds.lora.rank must be >= 0 (0: train full weights), got {args.ds.lora.rank}")
    if args.ds.lora.rank > 0 and not args.ds.lora.alpha > 0:
        raise ArgumentError(f"--ds.lora.alpha must be > 0 with --ds.lora.rank > 0, got {args.ds.lora.alpha}")
    if args.ds.lora.rank > 0 and not 0.0 <= args.ds.lora.dropout < 1.0:
        raise ArgumentError(f"--ds.lora.dropout must be in [0, 1), got {args.ds.lora.dropout}")
    if args.ds.lora.rank > 0 and args.ds.tensor_parallel_size > 1:
        raise ArgumentError(
            "--ds.lora.rank > 0 with --ds.tensor_parallel_size > 1 is not supported by TSD-KD: the merged LoRA "
            "weights sent to vLLM are built from unsplit layers; use --ds.tensor_parallel_size 1 (ZeRO shards instead)"
        )
    if args.ds.lora.rank > 0 and args.ds.load_in_4bit:
        raise ArgumentError(
            "--ds.load_in_4bit with --ds.lora.rank > 0 (QLoRA) is not supported by TSD-KD: vLLM would receive "
            "merged 4-bit weights it cannot load; drop --ds.load_in_4bit"
        )
    if args.ds.packing_samples:
        raise ArgumentError("--ds.packing_samples is not supported by TSD-KD yet (--ds.ring_attn_size > 1 turns it on "
                            "too); drop the flag, or use --ds.ring_attn_size 1")


def required_gpus(args: SimpleNamespace) -> Dict[str, int]:
    actor = args.actor.num_nodes * args.actor.num_gpus_per_node
    vllm = args.vllm.num_engines * args.vllm.tensor_parallel_size
    teacher = args.teacher.num_nodes * args.teacher.num_gpus_per_node if args.teacher.placement == "separate" else 0
    plan = {"actor": actor, "teacher": teacher, "vllm": vllm}
    plan["total"] = max(actor, vllm) + teacher if args.train.colocate_all else actor + teacher + vllm
    return plan


def check_cluster_capacity(args: SimpleNamespace, cluster_gpus: float) -> None:
    plan = required_gpus(args)
    if plan["total"] > cluster_gpus:
        raise ArgumentError(
            f"the launch needs {plan['total']} GPUs (actor {plan['actor']} via --actor.num_nodes x "
            f"--actor.num_gpus_per_node, teacher {plan['teacher']} via --teacher.*, vLLM {plan['vllm']} via "
            f"--vllm.num_engines x --vllm.tensor_parallel_size{', colocated' if args.train.colocate_all else ''}) "
            f"but the Ray cluster has {cluster_gpus:g}; lower those flags or add nodes"
        )


def resolved_plan(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> Dict:
    """What will be launched, for --tsdkd.dry_run and the run log."""
    gpus = required_gpus(args)
    return {
        "policy": {"nodes": args.actor.num_nodes, "gpus_per_node": args.actor.num_gpus_per_node,
                   "model": args.actor.model_name_or_path, "zero_stage": args.ds.zero_stage},
        "vllm": {"engines": args.vllm.num_engines, "tensor_parallel_size": args.vllm.tensor_parallel_size,
                 "colocated_with_policy": bool(args.train.colocate_all)},
        "teacher": {"placement": args.teacher.placement, "model": args.teacher.model_name_or_path,
                    "nodes": args.teacher.num_nodes if args.teacher.placement == "separate" else args.actor.num_nodes,
                    "gpus_per_node": args.teacher.num_gpus_per_node if args.teacher.placement == "separate" else 0,
                    "transport": f"sparse top-{args.teacher.sparse_top_k}" if args.teacher.placement == "separate" else "dense"},
        "gpus": gpus,
        "shared_vocab_size": shared_vocab_size,
        "objective": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "rollout": {"n_samples_per_prompt": args.rollout.n_samples_per_prompt, "batch_size": args.rollout.batch_size,
                    "max_new_tokens": args.rollout.max_new_tokens, "temperature": args.rollout.temperature},
    }
