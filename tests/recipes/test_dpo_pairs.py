"""DPO pairs: the teacher's score of a student sample is TSD-KD's sequence score (checked against
an independent float64 log-likelihood), the best and worst scored samples form the pair, and the
sharded phases resume and fail with one line. The vLLM sampling phase runs in the Ray-cluster
test (test_recipes_on_a_ray_cluster.py), which trains the DPO recipe on its pairs."""

from __future__ import annotations

import json
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tsdkd_plugin.recipes_tools import dpo_pairs
from tsdkd_plugin.recipes_tools.sampling import prompt_token_ids


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sample_rows(tokenizer, shared: int):
    """Two prompts x 3 responses of different lengths; one response samples a padding row (an id
    past the tokenizer: the teacher leaves it out of the score, as in TSD-KD training)."""
    rng = random.Random(0)
    rows = []
    for index, question in enumerate(["Q: 1+2=?", "Q: 30-4*5=?"]):
        prompt = [{"role": "user", "content": question}]
        prompt_ids = prompt_token_ids(tokenizer, prompt)
        responses = [[rng.randrange(shared) for _ in range(length)] for length in (3, 9, 5)]
        rows.append({"index": index, "prompt": prompt, "prompt_token_ids": prompt_ids,
                     "responses": [f"r{index}.{i}" for i in range(3)], "response_token_ids": responses})
    rows[1]["response_token_ids"][0][2] = shared + 5  # a padding row of the teacher's output layer
    return rows


def independent_scores(teacher_dir, rows, shared: int):
    """Mean log p_teacher(response token | everything before), softmax over the shared ids only,
    float64, one unpadded sequence at a time, padding-row tokens left out."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).double().eval()
    out = []
    for row in rows:
        scores = []
        for response in row["response_token_ids"]:
            ids = row["prompt_token_ids"] + response
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            start = len(row["prompt_token_ids"])
            logprobs = torch.log_softmax(logits[start - 1:-1, :shared], dim=-1)
            kept = [(t, token) for t, token in enumerate(response) if token < shared]
            scores.append(sum(logprobs[t, token].item() for t, token in kept) / len(kept))
        out.append(scores)
    return out


def test_teacher_scores_are_tsdkds_sequence_score(toy_student_dir, toy_teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(toy_teacher_dir))
    shared = len(tokenizer)
    rows = sample_rows(tokenizer, shared)
    options = Namespace(student=str(toy_student_dir), teacher=str(toy_teacher_dir), temperature_score=1.0,
                        attn_implementation="sdpa", dtype="fp32", score_batch_tokens=40)  # several batches
    out = tmp_path / "scored.jsonl"
    dpo_pairs.run_score(options, rows, out)
    scored = read_jsonl(out)
    expected = independent_scores(toy_teacher_dir, rows, shared)
    for row, want in zip(scored, expected):
        assert row["scores"] == pytest.approx(want, abs=1e-5)
        assert row["response_token_ids"] and row["prompt"]  # the samples are kept alongside


def test_pairs_are_best_versus_worst_and_finished_shards_are_not_redone(toy_student_dir, toy_teacher_dir, tmp_path,
                                                                        capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"Q{i}"}]}
                                                       for i in range(3)])
    work = tmp_path / "work"
    work.mkdir()
    # Two shards with both phases already done (as after a killed run that got this far): nothing
    # is sampled or scored again; the pairs are formed from the files, in prompt order.
    scored = [
        {"index": 0, "prompt": [{"role": "user", "content": "Q0"}], "responses": ["a", "b", "c"],
         "scores": [-1.5, -0.2, -3.0]},
        {"index": 1, "prompt": [{"role": "user", "content": "Q1"}], "responses": ["d", "e"], "scores": [-1.0, -1.0]},
        {"index": 2, "prompt": [{"role": "user", "content": "Q2"}], "responses": ["f", "g"], "scores": [-2.0, -0.5]},
    ]
    for shard, rows in ((0, [scored[0], scored[2]]), (1, [scored[1]])):
        write_jsonl(work / f"samples.{shard}.jsonl", rows)
        write_jsonl(work / f"scored.{shard}.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    argv = ["--student", str(toy_student_dir), "--teacher", str(toy_teacher_dir), "--prompts", str(prompts),
            "--work-dir", str(work), "--out", str(out), "--gpus", "2"]
    assert dpo_pairs.main(argv) == 0
    pairs = read_jsonl(out)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("Q0", "b", "c"), ("Q2", "g", "f")]  # Q1: a tie carries no preference
    assert len(read_jsonl(work / "scored.jsonl")) == 3
    assert not list(work.glob("*.log"))  # no child process was started
    assert "1 prompts whose samples the teacher scores alike" in capsys.readouterr().err


def test_a_failed_shard_stops_with_one_line_naming_its_log(toy_student_dir, toy_teacher_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Q0"}]}])
    work = tmp_path / "work"
    work.mkdir()
    (work / "samples.0.jsonl").write_text("{not json\n")  # a sample shard the score phase cannot read
    argv = ["--student", str(toy_student_dir), "--teacher", str(toy_teacher_dir), "--prompts", str(prompts),
            "--work-dir", str(work), "--out", str(tmp_path / "pairs.jsonl")]
    assert dpo_pairs.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpo_pairs: error: the score phase failed for 1 of 1 shard(s)")
    assert f"see {work / 'score.0.log'}" in err[-1] and "rerun the same command" in err[-1]
    assert "not valid JSON" in (work / "score.0.log").read_text()
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--num-samples", "1"], "--num-samples must be at least 2"),
    (["--gpus", "3", "--gpus-per-process", "2"], "--gpus (3) must be a positive multiple of --gpus-per-process (2)"),
])
def test_bad_options_are_one_sentence(toy_student_dir, toy_teacher_dir, tmp_path, capsys, extra, expected):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Q0"}]}])
    argv = ["--student", str(toy_student_dir), "--teacher", str(toy_teacher_dir), "--prompts", str(prompts),
            "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o.jsonl"), *extra]
    assert dpo_pairs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dpo_pairs: error: {expected}" or (err.startswith("dpo_pairs: error:") and expected in err)
