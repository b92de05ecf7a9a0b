"""Experiments on the built-in task: the main job, the comparison with baselines, and what they share.

This layer drives OpenRLHF's real command lines (as subprocesses) on the fixtures and the task of
`tsdkd_plugin.toy`; the toy package itself knows nothing of training runs.

- `budgets`:        teacher/student SFT recipes, the per-method distillation budget, named budgets
- `runner`:         run one command with its log, a progress bar and a time limit; child environment
- `flags`:          the OpenRLHF flags of every training command (SFT, on-policy, TSD-KD, DPO)
- `trained_models`: teacher and initial student trained by `train_sft`, cached by recipe
- `metrics`:        per-step metrics read back from the TensorBoard events the runs write
- `evaluate`:       the toy task's evaluator (greedy accuracy by the verifier) and sampling
- `methods`:        SeqKD, GKD, GRPO, DPO, TSD-KD and its ablations as runs at equal budget
- `protocol`:       the comparison's statistics (means, 95% intervals, paired differences, best trial)
- `comparison`:     the comparison's regimes, runs, tuning and test seeds, resumable from run files
- `options`:        the command-line options the entry points share, checked once
- `report`:         markdown, PNG and JSON reports
- `main_job`, `compare`, `calibrate`: the entry points (`python -m tsdkd_plugin.experiments.main_job`, ...)

Nothing heavy is imported here.
"""
