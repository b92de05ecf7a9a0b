"""The student and teacher models, checked cheaply but for real, and the ranges that depend on them.

For a local model directory (a hub name gets the config and tokenizer checks only; its files are
not here to read):
- `config.json` is valid JSON, an object, and loads with AutoConfig;
- every JSON file of the tokenizer parses, and the tokenizer loads;
- weight files are present and complete: each `*.safetensors` header is read (8-byte length + JSON)
  and the file's size checked against the largest data offset in it, so a truncated copy fails here
  and not in vLLM's engine core; a `*.safetensors.index.json` must name shards that exist and hold
  the tensors it maps to them; `pytorch_model*.bin` files must be complete zip archives;
- the config agrees with the weights: every declared layer has weights, the embedding has
  `vocab_size` rows of `hidden_size`.
Then, with both models known (`check_models`): one shared tokenizer, logit rows that cover it,
`--tsdkd.num_candidates` (k) and `--teacher.sparse_top_k` (K) within the shared vocabulary,
`--data.max_len` within both position limits, tensor-parallel sizes that divide the attention
heads, and LoRA target modules that exist in the student.

Checks of a model's family from its config alone (e.g. whether its output head can be reproduced
from hidden states, host/model_io.py) belong in `FAMILY_CHECKS`: each gets the `ModelFacts` right
after the config is read and raises ArgumentError.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

from tsdkd_plugin.host.args import ArgumentError
from tsdkd_plugin.objective import TSDKDConfig

STUDENT, TEACHER = "--actor.model_name_or_path", "--teacher.model_name_or_path"
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
# JSON files a tokenizer or generation config is read from (checked when present, so a truncated
# one is named, not reported as an anonymous parse error from the tokenizers library).
MODEL_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "generation_config.json")
# Files a tokenizer is loaded from; a local model directory needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the format's own limit on the JSON header
# Config keys vLLM derives the maximum model length from (the smallest present wins).
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                       "max_seq_length", "seq_len")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
EMBEDDING_SUFFIXES = ("embed_tokens.weight", ".wte.weight", "word_embeddings.weight", ".embed_in.weight")


def looks_local(path: str) -> bool:
    return path.startswith(LOCAL_PATH_PREFIXES) or os.path.exists(path)


def _error_text(error: BaseException, limit: int = 300) -> str:
    """A library error on one line (some put the reason on their second line)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ModelFacts:
    """What the preflight learned about one model."""

    option: str
    path: str
    config: Any  # transformers PretrainedConfig
    tokenizer: Any = None
    weights: Optional[Dict[str, Tuple[int, ...]]] = None  # tensor name -> shape (local safetensors only)
    weight_files: List[str] = field(default_factory=list)

    @property
    def named(self) -> str:
        return f"{self.option} {self.path!r}"

    @property
    def text_config(self):
        get = getattr(self.config, "get_text_config", None)
        return get() if callable(get) else self.config

    def setting(self, *names):
        """(name, value) of the first config attribute present, text config first."""
        for config in (self.text_config, self.config):
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return name, value
        return None, None

    def position_limit(self) -> Tuple[Optional[str], Optional[int]]:
        """(the config key, the longest sequence vLLM accepts) as vLLM derives it, rope scaling included."""
        present = [(name, getattr(self.text_config, name)) for name in POSITION_LIMIT_KEYS
                   if isinstance(getattr(self.text_config, name, None), int)]
        if not present:
            return None, None
        name, limit = min(present, key=lambda item: item[1])
        scaling = getattr(self.text_config, "rope_scaling", None) or getattr(self.text_config, "rope_parameters", None)
        if isinstance(scaling, dict) and scaling.get("factor"):
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in (None, "default", "su", "longrope", "llama3", "mrope"):
                limit = int(scaling.get("original_max_position_embeddings", limit) * scaling["factor"])
        return name, limit


# ----------------------------------------------------------------------------- files of one model


def _read_json(option: str, path: str, file_path: str):
    name = os.path.basename(file_path)
    try:
        with open(file_path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ArgumentError(
            f"{option} {path!r}: {name} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); "
            f"the file is truncated or corrupt: copy it again from the model's source"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ArgumentError(f"{option} {path!r}: {name} cannot be read ({getattr(error, 'strerror', None) or error})") from None


def check_model_path(option: str, path: Optional[str]) -> None:
    """The directory and its config.json (local paths); the CLI's first look at a model."""
    from tsdkd_plugin.host.preflight.options import require_option

    require_option(option, path)
    if not looks_local(path):
        return
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):
        raise ArgumentError(f"{option} {path!r} does not exist or is not a directory")
    config_file = os.path.join(expanded, "config.json")
    if not os.path.isfile(config_file):
        raise ArgumentError(f"{option} {path!r} has no config.json; point it at a saved HF model directory")
    config = _read_json(option, path, config_file)
    if not isinstance(config, dict):
        raise ArgumentError(
            f"{option} {path!r}: config.json holds a JSON {type(config).__name__}, not an object; it must be a HF "
            f"model config ({{\"model_type\": ..., ...}})"
        )
    for name in MODEL_JSON_FILES:
        if os.path.isfile(os.path.join(expanded, name)):
            _read_json(option, path, os.path.join(expanded, name))
    if not any(os.path.isfile(os.path.join(expanded, name)) for name in TOKENIZER_FILES):
        raise ArgumentError(
            f"{option} {path!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the tokenizer files "
            f"from the model's source (save_pretrained of the tokenizer)"
        )


def load_config(option: str, path: str):
    from transformers import AutoConfig

    try:  # a hub name that does not exist (or is not cached offline) fails here with one sentence
        return AutoConfig.from_pretrained(path, trust_remote_code=True)
    except Exception as error:  # OSError, ValueError (unknown model_type), TypeError, KeyError ...
        raise ArgumentError(
            f"{option} {path!r} cannot be loaded ({type(error).__name__}: {_error_text(error)}); check the name or "
            f"path, and network access (or the local cache with HF_HUB_OFFLINE=1) for hub models"
        ) from None


def load_tokenizer(option: str, path: str, use_fast: bool = True):
    """The tokenizer as OpenRLHF loads it (get_tokenizer: AutoTokenizer, trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=use_fast)
    except Exception as error:  # any failure is a bad model input here
        raise ArgumentError(
            f"{option} {path!r}: its tokenizer cannot be loaded ({type(error).__name__}: {_error_text(error)}); "
            f"point it at a model directory or hub name that includes a tokenizer"
        ) from None


def safetensors_header(option: str, path: str, file_path: str) -> Dict[str, Tuple[int, ...]]:
    """{tensor name: shape} from a .safetensors file's header; the file must be long enough for
    every tensor the header promises (a truncated copy is not)."""
    name = os.path.relpath(file_path, os.path.expanduser(path))
    where = f"{option} {path!r}: {name}"
    try:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ArgumentError(f"{where} is truncated ({size} bytes, no safetensors header); copy it again")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(SAFETENSORS_HEADER_LIMIT, size - 8):
                raise ArgumentError(
                    f"{where} is truncated or not a safetensors file (its header claims {header_length} bytes, the "
                    f"file has {size}); copy it again"
                )
            header = json.loads(handle.read(header_length))
    except OSError as error:
        raise ArgumentError(f"{where} cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArgumentError(f"{where} has a corrupt safetensors header; copy it again") from None
    if not isinstance(header, dict):
        raise ArgumentError(f"{where} has a corrupt safetensors header; copy it again")
    shapes, data_end = {}, 0
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            shapes[tensor] = tuple(int(d) for d in entry["shape"])
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ArgumentError(f"{where} has a corrupt safetensors header (tensor {tensor!r}); copy it again") from None
    if 8 + header_length + data_end > size:
        raise ArgumentError(
            f"{where} is truncated: {size} bytes, but its tensors need {8 + header_length + data_end}; copy it again"
        )
    return shapes


def _complete_zip(file_path: str) -> bool:
    try:
        with zipfile.ZipFile(file_path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_weights(option: str, path: str) -> Tuple[Optional[Dict[str, Tuple[int, ...]]], List[str]]:
    """({tensor: shape} or None for .bin weights, [weight files]) of a local model directory."""
    directory = os.path.expanduser(path)
    files = sorted(os.listdir(directory))
    index_files = [f for f in files if f.endswith(".safetensors.index.json")]
    if index_files:
        index = _read_json(option, path, os.path.join(directory, index_files[0]))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ArgumentError(f"{option} {path!r}: {index_files[0]} has no weight_map; copy it again")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise ArgumentError(
                f"{option} {path!r}: {index_files[0]} maps tensors to {len(missing)} shard(s) that are not there "
                f"({', '.join(missing[:3])}); copy the missing files"
            )
        weights: Dict[str, Tuple[int, ...]] = {}
        for shard in shards:
            held = safetensors_header(option, path, os.path.join(directory, shard))
            absent = [t for t, s in weight_map.items() if s == shard and t not in held]
            if absent:
                raise ArgumentError(
                    f"{option} {path!r}: {shard} lacks {len(absent)} tensor(s) that {index_files[0]} places there "
                    f"(e.g. {absent[0]}); the index and the shards do not belong together"
                )
            weights.update(held)
        return weights, shards
    safetensors = [f for f in files if f.endswith(".safetensors")]
    if safetensors:
        weights = {}
        for name in safetensors:
            weights.update(safetensors_header(option, path, os.path.join(directory, name)))
        return weights, safetensors
    bins = [f for f in files if re.fullmatch(r"pytorch_model.*\.bin", f)]
    for name in bins:
        if not _complete_zip(os.path.join(directory, name)):
            raise ArgumentError(f"{option} {path!r}: {name} is truncated or corrupt; copy it again")
    if bins:
        return None, bins
    raise ArgumentError(
        f"{option} {path!r} has a config.json but no weights (model.safetensors, a *.safetensors.index.json with its "
        f"shards, or pytorch_model.bin); copy the weight files in or point it at a complete model directory"
    )


def check_config_against_weights(facts: ModelFacts) -> None:
    """Layers, vocabulary rows and hidden size declared in config.json exist in the weights."""
    if not facts.weights:
        return
    files = ", ".join(facts.weight_files[:2]) + (" ..." if len(facts.weight_files) > 2 else "")
    layer_key, declared = facts.setting("num_hidden_layers", "n_layer", "num_layers")
    held = {int(m.group(1)) for name in facts.weights for m in [LAYER_INDEX.search(name)] if m}
    if isinstance(declared, int) and held and declared > max(held) + 1:
        raise ArgumentError(
            f"{facts.named}: config.json declares {declared} layers ({layer_key}) but {files} holds weights for "
            f"{max(held) + 1}; the config and the weights do not belong together"
        )
    embeddings = sorted((n for n in facts.weights if n.endswith(EMBEDDING_SUFFIXES) and len(facts.weights[n]) == 2),
                        key=len)
    if not embeddings:
        return
    rows, width = facts.weights[embeddings[0]]
    _, vocab_size = facts.setting("vocab_size")
    if isinstance(vocab_size, int) and vocab_size != rows:
        raise ArgumentError(
            f"{facts.named}: config.json says vocab_size {vocab_size} but {embeddings[0]} in {files} has {rows} "
            f"rows; the config and the weights do not belong together"
        )
    _, hidden = facts.setting("hidden_size", "n_embd", "d_model")
    if isinstance(hidden, int) and hidden != width:
        raise ArgumentError(
            f"{facts.named}: config.json says hidden_size {hidden} but {embeddings[0]} in {files} is {width} wide; "
            f"the config and the weights do not belong together"
        )


def check_output_head(facts: ModelFacts) -> None:
    """Logits made from hidden states (teacher scoring, the fused student step) must go through the
    family's own output head (e.g. Gemma-2's softcapping); a family whose head the plugin does not
    reproduce is refused, never computed wrong (host/model_io.py OUTPUT_HEADS)."""
    from tsdkd_plugin.host.model_io import output_head_problem

    problem = output_head_problem(facts.config)
    if problem:
        raise ArgumentError(f"{facts.named}: {problem}")


# Checks of a model's family from its config (each: ModelFacts -> None, raises ArgumentError).
FAMILY_CHECKS: List[Callable[[ModelFacts], None]] = [check_output_head]


# ----------------------------------------------------------------------------- both models


@dataclass
class Models:
    student: ModelFacts
    teacher: ModelFacts
    shared_vocab_size: int


def shared_vocabulary_size(student: ModelFacts, teacher: ModelFacts) -> int:
    """len(tokenizer) when both models use the same tokenizer, else an ArgumentError.

    Logit rows beyond len(tokenizer) are padding (e.g. 151,936 vs 152,064 for Qwen2.5
    1.5B vs 14B), so distributions are compared on ids [0, len(tokenizer))."""
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    try:
        shared = check_same_tokenizer(teacher.tokenizer, student.tokenizer, teacher.named, student.named)
    except ValueError as error:
        raise ArgumentError(f"{error} Pick a teacher from the student's model family.") from None
    for facts in (student, teacher):
        rows = getattr(facts.config, "vocab_size", None)
        if rows is not None and rows < shared:
            raise ArgumentError(
                f"{facts.named} has {rows} logit rows but its tokenizer has {shared} tokens; "
                f"the model and tokenizer do not belong together"
            )
    return shared


def check_vocabulary_ranges(config: TSDKDConfig, shared: int) -> None:
    """k and K select among the shared vocabulary's ids."""
    for flag, value, what in (("--tsdkd.num_candidates", config.num_candidates, "the student's candidates (k)"),
                              ("--teacher.sparse_top_k", config.sparse_top_k, "the teacher's top-K ids")):
        if value > shared:
            raise ArgumentError(
                f"{flag} ({value}) must be <= the {shared} tokens of the shared vocabulary: {what} are drawn from it"
            )


def check_lengths(args: SimpleNamespace, models: Models) -> None:
    """--data.max_len is vLLM's max_model_len for the student and the length the teacher scores."""
    for facts in (models.student, models.teacher):
        key, limit = facts.position_limit()
        if limit is not None and args.data.max_len > limit:
            raise ArgumentError(
                f"--data.max_len ({args.data.max_len}) exceeds the position limit of {facts.named} ({key} {limit} in "
                f"config.json): vLLM refuses a longer max_model_len and the model was not trained on longer "
                f"sequences; use --data.max_len {limit} or less"
            )


def check_parallel_sizes(args: SimpleNamespace, models: Models) -> None:
    _, heads = models.student.setting("num_attention_heads", "n_head")
    if not isinstance(heads, int):
        return
    for flag, size in (("--vllm.tensor_parallel_size", args.vllm.tensor_parallel_size),
                       ("--ds.tensor_parallel_size", args.ds.tensor_parallel_size)):
        if heads % size:
            raise ArgumentError(
                f"{flag} ({size}) must divide the {heads} attention heads of {models.student.named} "
                f"(num_attention_heads in config.json)"
            )


def check_lora_targets(args: SimpleNamespace, student: ModelFacts) -> None:
    """PEFT matches each --ds.lora.target_modules name against the ends of module names; a name that
    matches nothing is ignored (or, if none match, fails inside the policy actor)."""
    targets = args.ds.lora.target_modules
    if args.ds.lora.rank <= 0 or not student.weights or isinstance(targets, str) or not targets:
        return
    modules = {name.rsplit(".", 1)[0] for name, shape in student.weights.items() if len(shape) == 2}
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unmatched:
        linear = sorted({m.rsplit(".", 1)[-1] for m in modules if re.search(r"\.\d+\.", m)})
        raise ArgumentError(
            f"--ds.lora.target_modules {' '.join(unmatched)} names no module of {student.named}; its layers have "
            f"{', '.join(linear[:12])} (or use all-linear)"
        )


def inspect_model(option: str, path: str, use_fast: bool) -> ModelFacts:
    """Config and tokenizer; the weight files are read by `inspect_weights` (after the tokenizers
    are compared, so a teacher of another family is named as such first)."""
    check_model_path(option, path)
    facts = ModelFacts(option, path, load_config(option, path))
    for check in FAMILY_CHECKS:  # config-only: a family the plugin cannot serve is named first
        check(facts)
    facts.tokenizer = load_tokenizer(option, path, use_fast)
    return facts


def inspect_weights(facts: ModelFacts) -> None:
    if looks_local(facts.path):
        facts.weights, facts.weight_files = read_weights(facts.option, facts.path)
        check_config_against_weights(facts)


def check_models(args: SimpleNamespace, config: TSDKDConfig) -> Models:
    use_fast = not args.data.disable_fast_tokenizer
    student = inspect_model(STUDENT, args.actor.model_name_or_path, use_fast)
    teacher = inspect_model(TEACHER, args.teacher.model_name_or_path, use_fast)
    models = Models(student, teacher, shared_vocabulary_size(student, teacher))
    for facts in (student, teacher):
        inspect_weights(facts)
    check_vocabulary_ranges(config, models.shared_vocab_size)
    check_lengths(args, models)
    check_parallel_sizes(args, models)
    check_lora_targets(args, student)
    return models
