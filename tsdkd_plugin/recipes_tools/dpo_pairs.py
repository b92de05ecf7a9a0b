"""Preference pairs for the DPO baseline: the student samples, the teacher ranks.

    python -m tsdkd_plugin.recipes_tools.dpo_pairs --student Qwen/Qwen2.5-1.5B-Instruct \\
        --teacher Qwen/Qwen2.5-14B-Instruct --prompts data/tsdkd_prompts.jsonl \\
        --work-dir gen/dpo --out data/dpo_pairs.jsonl --gpus 8

For every prompt of the TSD-KD prompt file (prepare_data prompts), the student writes
--num-samples responses with vLLM (temperature 1.0 and --max-new-tokens, as TSD-KD's rollouts);
the teacher scores each with the score TSD-KD's sequence-level ranking uses: its
length-normalized log-likelihood of the response over the shared vocabulary, computed by the
TSD-KD teacher's own code (`tsdkd_plugin.host.teachers.scoring.score_samples`, on an OpenRLHF `Actor`).
The best-scored response becomes `chosen`, the worst `rejected` (prepare_data's teacher-ranked
pairs: ties and groups closer than --min-margin carry no preference and are skipped).

Two phases, each run in child processes over shards of the prompts, one shard per
--gpus-per-process GPUs of this node (CUDA_VISIBLE_DEVICES; the sharding of `sampling`), so vLLM
and the teacher each get the GPUs to themselves; the teacher must fit one GPU (a 14B teacher in
bf16 fits an 80 GB GPU):

    1. sample  -> WORK_DIR/samples.<shard>.jsonl  {prompt, prompt_token_ids, responses, response_token_ids}
    2. score   -> WORK_DIR/scored.<shard>.jsonl   the same rows plus "scores"
    then       -> OUT (pairs) and WORK_DIR/scored.jsonl (every sample with its score)

A shard file is written under a temporary name and renamed when complete, and a rerun skips the
shards that exist: a killed run continues where it stopped (delete WORK_DIR to start over; it
must be deleted when the models, prompts or sampling settings change). A failed shard stops the
run with one line naming its log file (WORK_DIR/<phase>.<shard>.log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from tsdkd_plugin.recipes_tools.prepare_data import DataError, Summary, load_rows, teacher_ranked_pairs, write_jsonl
from tsdkd_plugin.recipes_tools.sampling import (
    add_sampling_arguments,
    check_model_dir,
    check_sampling_options,
    merged_shards,
    read_prompts,
    run_shards,
    sample_rows,
    shard_rows,
)

PROG = "python -m tsdkd_plugin.recipes_tools.dpo_pairs"
MODULE = "tsdkd_plugin.recipes_tools.dpo_pairs"
PHASES = ("sample", "score")


def shard_file(work_dir: Path, phase: str, shard: int) -> Path:
    return work_dir / f"{'samples' if phase == 'sample' else 'scored'}.{shard}.jsonl"


# --------------------------------------------------------------------------- phase 2: score


def score_batches(rows: List[dict], max_tokens: int) -> Iterator[List[tuple]]:
    """(row index, sample index) pairs grouped by length, at most max_tokens padded tokens a batch."""
    samples = sorted(
        ((r, s) for r, row in enumerate(rows) for s in range(len(row["response_token_ids"]))),
        key=lambda rs: (len(rows[rs[0]]["prompt_token_ids"]), len(rows[rs[0]]["response_token_ids"][rs[1]])),
    )
    batch: List[tuple] = []
    longest_prompt = longest_response = 0
    for r, s in samples:
        prompt_len, response_len = len(rows[r]["prompt_token_ids"]), len(rows[r]["response_token_ids"][s])
        width = max(longest_prompt, prompt_len) + max(longest_response, response_len)
        if batch and width * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest_prompt, longest_response = [], 0, 0
        batch.append((r, s))
        longest_prompt, longest_response = max(longest_prompt, prompt_len), max(longest_response, response_len)
    if batch:
        yield batch


def pack_batch(rows: List[dict], batch: List[tuple], pad_id: int):
    """OpenRLHF's layout: [left-padded prompt | right-padded response], with the attention mask
    and the action mask of the response tokens (what the TSD-KD teacher receives)."""
    import torch

    prompts = [rows[r]["prompt_token_ids"] for r, _ in batch]
    responses = [rows[r]["response_token_ids"][s] or [pad_id] for r, s in batch]
    prompt_width, response_width = max(map(len, prompts)), max(map(len, responses))
    sequences = torch.full((len(batch), prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    action_mask = torch.zeros(len(batch), response_width, dtype=torch.bool)
    for i, ((r, s), prompt, response) in enumerate(zip(batch, prompts, responses)):
        start = prompt_width - len(prompt)
        sequences[i, start:prompt_width] = torch.tensor(prompt)
        sequences[i, prompt_width:prompt_width + len(response)] = torch.tensor(response)
        attention_mask[i, start:prompt_width + len(response)] = 1
        action_mask[i, :len(rows[r]["response_token_ids"][s])] = True
    return sequences, action_mask, attention_mask


def run_score(options, rows: List[dict], out: Path) -> None:
    import torch
    from openrlhf.models import Actor
    from transformers import AutoTokenizer

    from tsdkd_plugin.host.device import current_device
    from tsdkd_plugin.host.teachers.scoring import score_samples
    from tsdkd_plugin.objective import TSDKDConfig

    shared = shared_vocabulary(options)
    config = TSDKDConfig(temperature=options.temperature_score, sparse_top_k=min(64, shared))
    # The TSD-KD teacher's model (an OpenRLHF Actor at temperature 1: the score's temperature is
    # applied by the objective's code), without DeepSpeed: one replica per process.
    model = Actor(options.teacher, attn_implementation=options.attn_implementation, param_dtype=options.dtype,
                  packing_samples=False, temperature=1.0)
    model.to(current_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.teacher)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: Dict[tuple, float] = {}
    for batch in score_batches(rows, options.score_batch_tokens):
        sequences, action_mask, attention_mask = pack_batch(rows, batch, pad_id)
        with torch.no_grad():
            signals = score_samples(model, 0, config, shared, sequences, action_mask, attention_mask, None)
        for key, value in zip(batch, signals["sequence_scores"].tolist()):
            scores[key] = value
    write_jsonl(({**row, "scores": [scores[(r, s)] for s in range(len(row["response_token_ids"]))]}
                 for r, row in enumerate(rows)), str(out))


# --------------------------------------------------------------------------- orchestration


def shared_vocabulary(options) -> int:
    """len(tokenizer) when student and teacher share one tokenizer (as TSD-KD requires), else a
    DataError: the teacher can only score token ids that mean the same to both."""
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    try:
        return check_same_tokenizer(options.teacher, options.student, f"--teacher {options.teacher!r}",
                                    f"--student {options.student!r}")
    except (OSError, ValueError) as error:
        raise DataError(str(error).strip().splitlines()[0]) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="student model (HF name or directory): writes the samples")
    parser.add_argument("--teacher", required=True, help="teacher model (same tokenizer as the student): ranks them")
    parser.add_argument("--out", required=True, help="DPO pairs JSONL (train_dpo: prompt/chosen/rejected)")
    parser.add_argument("--work-dir", required=True, help="samples and scores per shard, and the logs")
    add_sampling_arguments(parser, num_samples=4, temperature=1.0)
    parser.add_argument("--temperature-score", type=float, default=1.0,
                        help="temperature of the teacher's score (TSD-KD's --tsdkd.temperature; default 1.0)")
    parser.add_argument("--min-margin", type=float, default=0.0,
                        help="skip prompts whose best and worst scores differ by at most this")
    parser.add_argument("--attn-implementation", default="flash_attention_2",
                        help="teacher attention (OpenRLHF's --ds.attn_implementation; sdpa without flash-attn)")
    parser.add_argument("--score-batch-tokens", type=int, default=16384,
                        help="padded tokens per teacher forward (default 16384)")
    return parser


def check_options(options) -> None:
    check_sampling_options(options)
    if options.num_samples < 2:
        raise DataError(f"--num-samples must be at least 2 (a pair needs two responses), got {options.num_samples}")
    check_model_dir("--student", options.student)
    check_model_dir("--teacher", options.teacher)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(argv)
    work_dir = Path(options.work_dir)
    try:
        check_options(options)
        rows = read_prompts(options.prompts, options.input_key, options.max_prompts)
        if options.phase == "sample":  # a child: one shard of one phase
            write_jsonl(sample_rows(options.student, shard_rows(rows, options.shard, options.num_shards), options),
                        str(shard_file(work_dir, "sample", options.shard)))
            return 0
        if options.phase == "score":
            samples = list(load_rows(str(shard_file(work_dir, "sample", options.shard))))
            run_score(options, samples, shard_file(work_dir, "score", options.shard))
            return 0
        shared_vocabulary(options)
        work_dir.mkdir(parents=True, exist_ok=True)
        num_shards = min(options.gpus // options.gpus_per_process, len(rows))
        for phase in PHASES:
            print(f"dpo_pairs: {phase} ({num_shards} shard(s), logs in {work_dir})", file=sys.stderr, flush=True)
            run_shards(MODULE, argv, phase, num_shards, options.gpus_per_process,
                       lambda shard: shard_file(work_dir, phase, shard), work_dir)
        scored = merged_shards(num_shards, lambda shard: shard_file(work_dir, "score", shard))
        write_jsonl(({key: row[key] for key in ("prompt", "responses", "scores")} for row in scored),
                    str(work_dir / "scored.jsonl"))
        summary = Summary()
        pairs = list(teacher_ranked_pairs(scored, str(work_dir / "scored.jsonl"), summary,
                                          min_margin=options.min_margin))
        if not pairs:
            raise DataError(f"no preference pairs could be formed ({summary.line('dpo_pairs', options.out)})")
        summary.written = write_jsonl(pairs, options.out)
    except DataError as error:
        print(f"dpo_pairs: error: {error}", file=sys.stderr)
        return 2
    print(summary.line("dpo_pairs", options.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
