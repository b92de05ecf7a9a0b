"""The task files as OpenRLHF's own loaders and dataset classes read them."""

from types import SimpleNamespace

import pytest

from tsdkd_plugin.toy.arith_task import write_task_files


def make_strategy(**data_args):
    """The few attributes OpenRLHF's datasets and blending_datasets read from a strategy."""
    return SimpleNamespace(
        args=SimpleNamespace(data=SimpleNamespace(**data_args), use_ms=False),
        is_rank_0=lambda: True,
        print=lambda *args, **kwargs: None,
    )


def load_rows(path, strategy):
    from openrlhf.datasets.utils import blending_datasets

    return blending_datasets(str(path), None, strategy, dataset_split="train")


def test_prompt_dataset_chat(arith_data_dir, toy_tokenizer):
    from openrlhf.datasets import PromptDataset

    strategy = make_strategy(input_key="prompt", label_key="answer", apply_chat_template=True)
    dataset = PromptDataset(load_rows(arith_data_dir / "prompts_train.jsonl", strategy), toy_tokenizer, strategy)
    assert len(dataset) == 64
    datasource, prompt, label, images = dataset[0]
    assert datasource == "arith_easy" and images is None
    assert prompt.startswith("<|im_start|>user\nQ: ") and prompt.endswith("=?<|im_end|>\n<|im_start|>assistant\n")
    assert label.isdigit()
    datasources, prompts, labels, _ = dataset.collate_fn([dataset[i] for i in range(4)])
    assert len(prompts) == len(labels) == 4


def test_prompt_dataset_text_format(tmp_path, toy_tokenizer):
    from openrlhf.datasets import PromptDataset

    write_task_files(tmp_path, n_train=8, n_val=2, n_test=2, prompt_format="text")
    strategy = make_strategy(input_key="prompt", label_key="answer", apply_chat_template=False)
    dataset = PromptDataset(load_rows(tmp_path / "prompts_test.jsonl", strategy), toy_tokenizer, strategy)
    _, prompt, label, _ = dataset[0]
    assert prompt.startswith("Q: ") and prompt.endswith("=? A:") and label.isdigit()


def test_sft_dataset(arith_data_dir, toy_tokenizer):
    from openrlhf.datasets import SFTDataset

    strategy = make_strategy(input_key="prompt", output_key="response", apply_chat_template=True)
    rows = load_rows(arith_data_dir / "sft_train.jsonl", strategy)
    dataset = SFTDataset(rows, toy_tokenizer, 256, strategy, num_processors=1)
    assert len(dataset) == 64
    solution = rows[0]["response"][0]["content"]
    assert dataset.responses[0] == solution + "<|im_end|>\n"
    input_ids, attention_mask, loss_mask = dataset[0]
    assert input_ids[0, -1].item() == toy_tokenizer.eos_token_id
    # The loss covers exactly the solution and its <|im_end|> (mask is shifted by one: predicts the next token).
    target_ids = input_ids[0, 1:][loss_mask[0, :-1].bool()]
    assert toy_tokenizer.decode(target_ids) == solution + "<|im_end|>"


@pytest.mark.parametrize("split", ["train", "val"])
def test_dpo_dataset(arith_data_dir, toy_tokenizer, split):
    from openrlhf.datasets import RewardDataset

    strategy = make_strategy(
        prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=True
    )
    rows = load_rows(arith_data_dir / f"dpo_{split}.jsonl", strategy)
    dataset = RewardDataset(rows, toy_tokenizer, 256, strategy, is_dpo=True, num_processors=1)
    assert len(dataset) == len(rows)
    assert dataset.prompts[0].endswith("<|im_start|>assistant\n")
    assert dataset.chosens[0] == rows[0]["chosen"][0]["content"] + "<|im_end|>\n"
    assert dataset.rejects[0] == rows[0]["rejected"][0]["content"] + "<|im_end|>\n"
    assert dataset.chosens[0] != dataset.rejects[0]
    chosen_ids, _, rejected_ids, _, prompt_len = dataset[0]
    assert chosen_ids[0, :prompt_len].tolist() == rejected_ids[0, :prompt_len].tolist()
