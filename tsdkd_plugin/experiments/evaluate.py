"""The toy task's one evaluator: greedy accuracy of a saved HF model directory on a split of the
arithmetic task; and the sampling and teacher scoring the SeqKD and DPO baselines build their data with.

    python -m tsdkd_plugin.experiments.evaluate --model DIR --prompts data/prompts_test.jsonl [--json OUT]

Accuracy is what the task's verifier says (the integer after `####` equals the
label), overall and by number of operations. Prompts are rendered exactly as
OpenRLHF renders them with `--data.apply_chat_template` (the tokenizer's chat
template with the generation prompt), so a model is evaluated on the same
input format it was trained on.

Batched `transformers` generation is used rather than vLLM: the toy models are
tiny (hundreds of problems per second on two cores), and this keeps evaluation
free of engine start-up time and of Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tsdkd_plugin.experiments.runner import TRAINING_THREADS
from tsdkd_plugin.toy.arith_task import LABEL_KEY, PROMPT_KEY, extract_final_answer, verify

DEFAULT_MAX_NEW_TOKENS = 64  # budgets.MAX_NEW_TOKENS_BY_DIFFICULTY["easy"]
DEFAULT_BATCH_SIZE = 256
NUM_EXAMPLES_KEPT = 8


@dataclass
class OpsBucket:
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class EvalResult:
    """What one model got right on one split."""

    model: str
    prompts: str
    n: int
    correct: int
    answered: int  # responses that contain a well-formed `#### n`, right or wrong
    by_num_ops: dict[int, OpsBucket]
    seconds: float
    examples: list[dict] = field(default_factory=list)
    decoding: str = "greedy"  # or "sampled": one sample per prompt at temperature 1, as in the rollouts

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["accuracy"] = self.accuracy
        data["answered_rate"] = self.answered / self.n if self.n else 0.0
        # JSON object keys are strings; sorted by number of operations.
        data["by_num_ops"] = {
            str(ops): {"n": b.n, "correct": b.correct, "accuracy": b.accuracy}
            for ops, b in sorted(self.by_num_ops.items())
        }
        return data


@contextlib.contextmanager
def fixed_threads(threads: int = TRAINING_THREADS):
    """torch's intra-op threads set to `threads` inside the block (restored after it), so generation
    and scoring give the same numbers on machines with other core counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_prompt_rows(path: str | Path) -> list[dict]:
    """Rows of a prompts_*.jsonl file (prompt, answer, num_ops), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; write it with python -m tsdkd_plugin.toy.arith_task"
        )
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if PROMPT_KEY not in row or LABEL_KEY not in row:
                raise ValueError(f"{path} line {line_number} has no {PROMPT_KEY!r} or {LABEL_KEY!r} key")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def render_prompt(tokenizer, prompt) -> str:
    """The text the model sees: chat messages through the chat template (with the
    assistant generation prompt), or a plain-text prompt as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def score_responses(rows: Sequence[Mapping], responses: Sequence[str]) -> tuple[int, int, dict[int, OpsBucket]]:
    """(correct, answered, per-number-of-operations buckets) for responses aligned with rows."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    correct = answered = 0
    buckets: dict[int, OpsBucket] = {}
    for row, response in zip(rows, responses, strict=True):
        ok = verify(response, row[LABEL_KEY])
        correct += ok
        answered += extract_final_answer(response) is not None
        bucket = buckets.setdefault(int(row.get("num_ops", 0)), OpsBucket())
        bucket.n += 1
        bucket.correct += ok
    return correct, answered, buckets


def load_model_for_eval(model_dir: str | Path):
    """(model, tokenizer) in fp32 on the CPU, in eval mode, tokenizer padding on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Our own bar shows progress; transformers' per-load "Loading weights" bars would only add noise.
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # Left padding: every prompt in a batch then ends where generation starts.
    tokenizer.padding_side = "left"
    # fp32 whatever the checkpoint was saved in (OpenRLHF saves bf16): tiny models, exact greedy ties.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's eos plus whatever the generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    ids.discard(None)
    return sorted(ids)


def generate_greedy(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    desc: str = "generating",
    do_sample: bool = False,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
) -> list[str]:
    """Responses (special tokens removed) for every prompt, in input order.

    With do_sample, `num_return_sequences` samples per prompt are returned
    consecutively (prompt i's samples at i*n .. i*n+n-1).
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Prompts of similar length share a batch (less padding); results are put back in order.
    order = sorted(range(len(prompt_texts)), key=lambda i: len(prompt_texts[i]))
    responses: list[list[str] | None] = [None] * len(prompt_texts)
    stops = stop_token_ids(model, tokenizer)
    bar = tqdm(total=len(prompt_texts), desc=desc, unit="prompt", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            # The chat template already wrote every special token the prompt needs.
            encoded = tokenizer(
                [prompt_texts[i] for i in batch_indices],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                num_return_sequences=num_return_sequences,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for position, i in enumerate(batch_indices):
                responses[i] = texts[position * num_return_sequences : (position + 1) * num_return_sequences]
            bar.update(len(batch_indices))
    bar.close()
    return [text for group in responses for text in group]


def evaluate_model(
    model_dir: str | Path,
    prompts_path: str | Path,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    sampled: bool = False,
    seed: int = 0,
) -> EvalResult:
    """Accuracy of the model in model_dir on the prompts file (optionally its first `limit` rows):
    greedy, or with `sampled` one sample per prompt at temperature 1 (seeded), which is what the
    on-policy methods train on. The same machine and libraries give the same result: the thread
    count is fixed (runner.TRAINING_THREADS)."""
    import torch

    rows = load_prompt_rows(prompts_path)
    if limit is not None:
        rows = rows[:limit]
    started = time.time()
    with fixed_threads():
        model, tokenizer = load_model_for_eval(model_dir)
        texts = [render_prompt(tokenizer, row[PROMPT_KEY]) for row in rows]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            responses = generate_greedy(
                model,
                tokenizer,
                texts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                desc=desc or f"evaluating {Path(model_dir).name}",
                do_sample=sampled,
            )
    correct, answered, buckets = score_responses(rows, responses)
    examples = [
        {
            "prompt": texts[i],
            "response": responses[i],
            "label": rows[i][LABEL_KEY],
            "correct": bool(verify(responses[i], rows[i][LABEL_KEY])),
        }
        for i in range(min(NUM_EXAMPLES_KEPT, len(rows)))
    ]
    return EvalResult(
        model=str(model_dir),
        prompts=str(prompts_path),
        n=len(rows),
        correct=correct,
        answered=answered,
        by_num_ops=buckets,
        seconds=time.time() - started,
        examples=examples,
        decoding="sampled" if sampled else "greedy",
    )


def evaluate_models(
    models: Mapping[str, Path], prompts_path: str | Path, *, max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[str, dict]:
    """{name: result dict with the model's directory} for several models on one split, one line printed each."""
    results = {}
    for name, model_dir in models.items():
        result = evaluate_model(
            model_dir, prompts_path, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"evaluating {name}"
        )
        print("  " + format_result_line(name, result), flush=True)
        results[name] = {**result.to_dict(), "dir": str(model_dir)}
    return results


def format_result_line(name: str, result: EvalResult) -> str:
    by_ops = " ".join(f"{ops}ops {b.accuracy:6.1%}" for ops, b in sorted(result.by_num_ops.items()))
    return f"{name:<18} {result.accuracy:6.1%}  ({result.correct}/{result.n})  {by_ops}"


# --------------------------------------------------------------------------- sampling and scoring


def sample_responses(
    model_dir: Path,
    prompt_rows: Sequence[Mapping],
    n: int,
    seed: int,
    max_new_tokens: int,
    desc: str,
    temperature: float = 1.0,
) -> list[list[str]]:
    """n sampled responses per prompt row (temperature 1 by default, like the rollouts)."""
    import torch

    with fixed_threads():
        model, tokenizer = load_model_for_eval(model_dir)
        texts = [render_prompt(tokenizer, row[PROMPT_KEY]) for row in prompt_rows]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flat = generate_greedy(
                model,
                tokenizer,
                texts,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                num_return_sequences=n,
                temperature=temperature,
                desc=desc,
            )
    return [flat[i * n : (i + 1) * n] for i in range(len(prompt_rows))]


def teacher_scores(
    teacher_dir: Path, prompt_rows: Sequence[Mapping], responses: Sequence[Sequence[str]], batch_size: int = 64
) -> list[list[float]]:
    """The teacher's length-normalized log-likelihood of each response (end-of-turn token included):
    the same sequence score the sequence-level TSD-KD ranking uses by default."""
    with fixed_threads():
        return _teacher_scores(teacher_dir, prompt_rows, responses, batch_size)


def _teacher_scores(teacher_dir, prompt_rows, responses, batch_size):
    import torch
    from tqdm.auto import tqdm

    model, tokenizer = load_model_for_eval(teacher_dir)
    tokenizer.padding_side = "right"
    end = tokenizer.eos_token
    pairs = [
        (render_prompt(tokenizer, row[PROMPT_KEY]), response + end)
        for row, group in zip(prompt_rows, responses, strict=True)
        for response in group
    ]
    scores: list[float] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(pairs), batch_size), desc="teacher scoring", leave=False):
            batch = pairs[start : start + batch_size]
            prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in batch]
            full_ids = [tokenizer(p + r, add_special_tokens=False)["input_ids"] for p, r in batch]
            width = max(len(ids) for ids in full_ids)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(full_ids):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1, : len(tokenizer)]
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            for i, (p_ids, ids) in enumerate(zip(prompt_ids, full_ids, strict=True)):
                # Response tokens are positions len(prompt)..len(full)-1; their log-probs sit one earlier.
                span = logprobs[i, len(p_ids) - 1 : len(ids) - 1]
                scores.append(float(span.mean()))
    n = len(responses[0]) if responses else 0
    return [scores[i * n : (i + 1) * n] for i in range(len(responses))]


# --------------------------------------------------------------------------- CLI


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tsdkd_plugin.experiments.evaluate",
        description="Greedy accuracy of a saved HF model on a prompts_*.jsonl split of the arithmetic task.",
    )
    parser.add_argument("--model", required=True, help="HF model directory (config.json, weights, tokenizer)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (prompt, answer, num_ops)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--json", default=None, help="write the full result (per-ops counts, examples) here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"evaluate: error: {model_dir} is not a saved HF model directory (no config.json).", file=sys.stderr)
        return 2
    try:
        result = evaluate_model(
            model_dir, args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    print(format_result_line(model_dir.name, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
