"""prepare_data turns instruction datasets into OpenRLHF prompt files and generation files into
DPO pairs that OpenRLHF's own dataset code reads as intended (small local files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsdkd_plugin.recipes_tools.prepare_data import main

INSTRUCTIONS = [
    {"instruction": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "response": "In May she sold 48/2 = 24. Total 48 + 24 = 72.\n#### 72"},
    {"instruction": "Simplify 2/4.", "response": "Divide both by 2: the answer is $\\boxed{\\frac{1}{2}}$."},
    {"instruction": "Write a haiku about rain.", "response": "Soft rain on the roof"},
    {"instruction": "   ", "response": "empty instruction"},
    {"instruction": "Simplify 2/4.", "response": "duplicate instruction"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_prompt_file_has_chat_messages_reference_responses_and_a_summary(tmp_path, capsys):
    source = write_jsonl(tmp_path / "gen.jsonl", INSTRUCTIONS)
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--dataset", str(source), "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 3
    assert rows[0]["prompt"] == [{"role": "user", "content": INSTRUCTIONS[0]["instruction"]}]
    assert rows[1]["response"] == INSTRUCTIONS[1]["response"]
    assert "label" not in rows[0]
    summary = capsys.readouterr().err
    assert "read 5 rows, wrote 3" in summary and "1 duplicate instructions" in summary and "1 empty instructions" in summary


def test_grpo_prompt_file_keeps_rows_with_a_verifiable_answer(tmp_path):
    source = write_jsonl(tmp_path / "gen.jsonl", INSTRUCTIONS)
    out = tmp_path / "grpo.jsonl"
    assert main(["prompts", "--dataset", str(source), "--label-from-response", "--require-label",
                 "--out", str(out)]) == 0
    rows = read_jsonl(out)
    # The haiku has no final answer: dropped; the others carry the answer the verifier checks.
    assert [row["label"] for row in rows] == ["72", "\\frac{1}{2}"]
    assert {row["label_source"] for row in rows} == {"ground_truth"}


def test_grpo_labels_come_from_ground_truth_joined_by_instruction_then_from_the_teacher(tmp_path, capsys):
    """The reference set's own responses (the student's) are never used: labels come from a
    ground-truth dataset joined by instruction (UltraInteract-SFT's layout), and where it has none,
    from the teacher's final answer; each row says which, and the summary counts them."""
    student_written = write_jsonl(tmp_path / "gen.jsonl", [
        {"instruction": "What is 6 * 7?", "response": "student says #### 41"},
        {"instruction": "Sum 2 and  3.", "response": "student says #### 6"},
        {"instruction": "Halve 9.", "response": "student says #### 4"},
        {"instruction": "Write a loop.", "response": "for i in range(10): print(i)"},
        {"instruction": "What is 8 - 5?", "response": "#### 3"},
    ])
    ground_truth = write_jsonl(tmp_path / "ultrainteract.jsonl", [
        {"task": "Math_CoT", "instruction": "What is 6 * 7?", "response": "Step 1: 6 * 7 = 42.\nAnswer:\n\\boxed{42}"},
        {"task": "Math_CoT", "instruction": "What is 6 * 7?", "response": "So the answer is 42."},  # agrees
        {"task": "Math_CoT", "instruction": "Sum 2 and 3.", "response": "2 + 3 = 5\nAnswer:\n\\boxed{5}"},  # whitespace
        {"task": "Coding", "instruction": "Write a loop.", "response": "for i in range(10):\n    print(i)"},  # no answer
        {"task": "Math_CoT", "instruction": "What is 8 - 5?", "response": "\\boxed{3}"},
        {"task": "Math_CoT", "instruction": "What is 8 - 5?", "response": "\\boxed{4}"},  # conflict: no label
    ])
    prompts_out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--dataset", str(student_written), "--out", str(prompts_out)]) == 0
    teacher = write_jsonl(tmp_path / "teacher.jsonl", [
        {"prompt": row["prompt"], "responses": [answer]} for row, answer in zip(read_jsonl(prompts_out), [
            "\\boxed{40}", "\\boxed{50}", "Half of 9 is 4.5, so the answer is 4.5.", "I would use 10 iterations", "#### 3"])
    ])
    out = tmp_path / "grpo.jsonl"
    capsys.readouterr()
    assert main(["prompts", "--dataset", str(student_written), "--ground-truth", str(ground_truth),
                 "--teacher-answers", str(teacher), "--require-label", "--out", str(out)]) == 0
    rows = {row["prompt"][0]["content"]: row for row in read_jsonl(out)}
    assert {k: (r["label"], r["label_source"]) for k, r in rows.items()} == {
        "What is 6 * 7?": ("42", "ground_truth"),
        "Sum 2 and  3.": ("5", "ground_truth"),
        "Halve 9.": ("4.5", "teacher"),  # no ground truth for it
        "What is 8 - 5?": ("3", "teacher"),  # ground truth ambiguous: the teacher decides
    }  # "Write a loop.": no stated answer anywhere (a stray number is no label): dropped
    summary = capsys.readouterr().err
    assert f"labels: 2 from ground truth ({ground_truth}), 2 from teacher answers ({teacher})" in summary
    assert "1 rows without a label" in summary and "1 ground-truth instructions with conflicting answers" in summary

    # The documented path: label the TSD-KD prompt file itself (the same prompts for both runs).
    labelled = tmp_path / "grpo_from_prompts.jsonl"
    assert main(["labels", "--prompts", str(prompts_out), "--ground-truth", str(ground_truth),
                 "--teacher-answers", str(teacher), "--require-label", "--out", str(labelled)]) == 0
    assert read_jsonl(labelled) == read_jsonl(out)
    assert f"labels: 2 from ground truth ({ground_truth}), 2 from teacher answers ({teacher})" in capsys.readouterr().err


def test_custom_columns_system_prompt_suffix_and_held_out_split(tmp_path, capsys):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(10)]
    source = write_jsonl(tmp_path / "gsm.jsonl", rows)
    out, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert main(["prompts", "--dataset", str(source), "--instruction-key", "question", "--response-key", "answer",
                 "--label-key", "answer", "--system-prompt", "Think step by step.", "--instruction-suffix", " /no_think",
                 "--eval-rows", "3", "--eval-out", str(held), "--out", str(out)]) == 0
    train_rows, held_rows = read_jsonl(out), read_jsonl(held)
    assert len(train_rows) == 7 and len(held_rows) == 3
    first = train_rows[0]
    assert first["prompt"][0] == {"role": "system", "content": "Think step by step."}
    assert first["prompt"][1]["content"].endswith("? /no_think")
    assert first["label"] == first["response"].rsplit("#### ", 1)[1]
    assert not {row["prompt"][1]["content"] for row in train_rows} & {row["prompt"][1]["content"] for row in held_rows}
    assert "(+3 held out)" in capsys.readouterr().err


def test_local_parquet_goes_through_datasets(tmp_path):
    import datasets

    source = tmp_path / "gen.parquet"
    datasets.Dataset.from_list(INSTRUCTIONS[:3]).to_parquet(str(source))
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--dataset", str(source), "--out", str(out)]) == 0
    assert len(read_jsonl(out)) == 3


@pytest.mark.parametrize("argv, expected", [
    (["--instruction-key", "question"], "no key 'question' (--instruction-key); available keys: ['instruction', 'response']"),
    (["--label-from-response", "--dataset", "Minsang/TSD-KD-Qwen2.5-1.5B-Instruct-Gen"],
     "would reward agreement with the student's own answers"),
    (["--require-label"], "--require-label needs a label source"),
    (["--eval-rows", "3"], "leaves no training rows"),
    (["--label-from-response", "--response-key", ""], "set --response-key"),
])
def test_bad_input_is_one_sentence_naming_the_option(tmp_path, capsys, argv, expected):
    source = write_jsonl(tmp_path / "gen.jsonl", INSTRUCTIONS[:3])
    assert main(["prompts", "--dataset", str(source), "--out", str(tmp_path / "o.jsonl"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prepare_data: error:") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_local_dataset_is_named(tmp_path, capsys):
    assert main(["prompts", "--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_prompt_rows_render_through_openrlhf_prompt_preprocessing(tmp_path, toy_tokenizer):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    source = write_jsonl(tmp_path / "gen.jsonl", INSTRUCTIONS[:1])
    out = tmp_path / "prompts.jsonl"
    main(["prompts", "--dataset", str(source), "--label-from-response", "--out", str(out)])
    row = read_jsonl(out)[0]
    prompt, label = preprocess_data(row, input_key="prompt", label_key="label",
                                    apply_chat_template=toy_tokenizer.apply_chat_template)
    assert prompt == f"<|im_start|>user\n{INSTRUCTIONS[0]['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    assert label == "72"


# --------------------------------------------------------------------------- DPO pairs


def test_teacher_vs_student_pairs_match_prompts(tmp_path, capsys):
    teacher = write_jsonl(tmp_path / "teacher.jsonl", [
        {"prompt": "Q1", "response": "teacher answer 1"},
        {"prompt": "Q2", "response": "same"},
        {"prompt": "Q3", "response": "teacher answer 3"},
    ])
    student = write_jsonl(tmp_path / "student.jsonl", [
        {"prompt": [{"role": "user", "content": "Q1"}], "response": "student answer 1"},  # messages match strings
        {"prompt": "Q2", "response": "same"},
        {"prompt": "Q4", "response": "student only"},
    ])
    out = tmp_path / "pairs.jsonl"
    assert main(["dpo-pairs", "--mode", "teacher-vs-student", "--teacher-file", str(teacher),
                 "--student-file", str(student), "--out", str(out)]) == 0
    pairs = read_jsonl(out)
    assert pairs == [{"prompt": [{"role": "user", "content": "Q1"}],
                      "chosen": [{"role": "assistant", "content": "teacher answer 1"}],
                      "rejected": [{"role": "assistant", "content": "student answer 1"}]}]
    summary = capsys.readouterr().err
    for reason in ("1 identical teacher and student responses", "1 prompts without a student response",
                   "1 prompts without a teacher response"):
        assert reason in summary


def test_teacher_ranked_pairs_take_best_and_worst(tmp_path):
    grouped = write_jsonl(tmp_path / "grouped.jsonl", [
        {"prompt": "Q1", "responses": ["a", "b", "c"], "scores": [-1.2, -0.3, -2.5]},
        {"prompt": "Q2", "responses": ["x", "y"], "scores": [-1.0, -1.0]},  # a tie: no preference
        {"prompt": "Q3", "responses": ["only"], "scores": [0.0]},
    ])
    out = tmp_path / "pairs.jsonl"
    assert main(["dpo-pairs", "--mode", "teacher-ranked", "--samples-file", str(grouped), "--out", str(out)]) == 0
    pairs = read_jsonl(out)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("b", "c")]

    flat = write_jsonl(tmp_path / "flat.jsonl", [
        {"prompt": "Q1", "response": "a", "score": 0.1}, {"prompt": "Q1", "response": "b", "score": 0.9},
        {"prompt": "Q2", "response": "c", "score": 0.5}, {"prompt": "Q2", "response": "d", "score": 0.45},
    ])
    assert main(["dpo-pairs", "--mode", "teacher-ranked", "--samples-file", str(flat), "--responses-key", "response",
                 "--scores-key", "score", "--min-margin", "0.1", "--out", str(out)]) == 0
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in read_jsonl(out)] == [("b", "a")]


def test_dpo_pairs_render_through_openrlhf_reward_dataset_preprocessing(tmp_path, toy_tokenizer):
    from openrlhf.datasets.reward_dataset import preprocess_data

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q1", "responses": ["good", "bad"], "scores": [1.0, 0.0]}])
    out = tmp_path / "pairs.jsonl"
    main(["dpo-pairs", "--mode", "teacher-ranked", "--samples-file", str(samples), "--out", str(out)])
    prompt, chosen, rejected, _ = preprocess_data(read_jsonl(out)[0], prompt_key="prompt", chosen_key="chosen",
                                                  rejected_key="rejected",
                                                  apply_chat_template=toy_tokenizer.apply_chat_template, is_dpo=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "Q1" in prompt
    assert chosen == "good<|im_end|>\n" and rejected == "bad<|im_end|>\n"


def test_dpo_pairs_errors_name_the_missing_option_or_key(tmp_path, capsys):
    assert main(["dpo-pairs", "--mode", "teacher-vs-student", "--teacher-file", "t.jsonl", "--out", "o.jsonl"]) == 2
    assert "needs --student-file" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "responses": ["a", "b"], "scores": [1.0]}])
    assert main(["dpo-pairs", "--mode", "teacher-ranked", "--samples-file", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "lists of equal length" in capsys.readouterr().err
