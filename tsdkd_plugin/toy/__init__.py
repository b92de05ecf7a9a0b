"""Offline fixtures and the built-in reasoning task (training runs on them: tsdkd_plugin.experiments).

- `tokenizer`:   toy byte-level BPE with ChatML; a Qwen2-size vocabulary
- `models`:      tiny Qwen2 teacher / student built from a config
- `cache`:       built-once, atomically written fixture directories (toy_tokenizer_dir, toy_model_dir, ...)
- `arith_task`:  multi-step arithmetic with worked solutions, verifier, OpenRLHF JSONL writers, CLI
- `reward_func`: the verifier as an OpenRLHF `--reward.remote_url` file

Nothing is imported here: `arith_task` and `reward_func` must stay light
(they run inside vLLM/Ray workers), the rest pulls in torch/transformers.
"""
