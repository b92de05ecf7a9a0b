"""Tools around the launch recipes in recipes/: data preparation, recipe checking, memory sizing,
evaluation (lm-evaluation-harness) and comparison of runs.

Each module is a command: `python -m tsdkd_plugin.recipes_tools.<module> --help`.

- prepare_data:  reference prompt set -> OpenRLHF prompt JSONL; DPO pairs for the DPO baseline
- recipe_check:  a recipe's command line against the real argument parser; resolved plan (dry run)
- memory:        per-GPU memory of each recipe's groups, from model configs
- evaluate:      one checkpoint on the reasoning benchmarks through lm_eval (vLLM or HF backend)
- local_tasks:   lm_eval task definitions for local JSONL files (offline checks, own benchmarks)
- compare:       several evaluation JSONs -> markdown table + PNG plot
- math_answers:  final-answer extraction and equivalence for GSM8K/MATH-style answers
"""
