"""Tools around the launch recipes in recipes/: data preparation, recipe checking, memory sizing,
evaluation (lm-evaluation-harness) and comparison of runs.

Each module is a command: `python -m tsdkd_plugin.recipes_tools.<module> --help`.

Data and evaluation (transformers, datasets, lm_eval; they run on a node without OpenRLHF):

- prepare_data:  reference prompt set -> OpenRLHF prompt JSONL; GRPO labels; DPO pairs from generation files
- evaluate:      one checkpoint on the paper's ten benchmarks through lm_eval (vLLM or HF backend)
- local_tasks:   lm_eval task definitions for local JSONL files (offline checks, own benchmarks)
- compare:       several evaluation JSONs -> markdown table + PNG plot
- math_answers:  final-answer extraction and equivalence (math-verify, regex fallback)

Cluster side (they run the plugin's own parsers and teacher code, so they import tsdkd_plugin.cli,
.host and .objective, OpenRLHF and vLLM):

- recipe_check:  a recipe's command line against the real argument parser; resolved plan (dry run)
- memory:        per-GPU memory of each recipe's groups, from model configs
- sampling:      a model's responses to a prompt file with vLLM, sharded over a node's GPUs
- dpo_pairs:     student samples ranked by the TSD-KD teacher's score -> DPO pairs
"""
