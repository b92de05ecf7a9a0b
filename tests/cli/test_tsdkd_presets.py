"""--tsdkd.preset paper|reference (every explicit --tsdkd.* flag wins over it), --tsdkd.diagnostics and the
remedies' flags (--tsdkd.listmle_normalize, --tsdkd.weight_warmup_steps, --tsdkd.term_balance)."""

from __future__ import annotations

import pytest

from tsdkd_plugin.cli.train_tsdkd import parse_args
from tsdkd_plugin.objective import PRESETS, TSDKDConfig

BASE = [
    "--actor.model_name_or_path", "student", "--teacher.model_name_or_path", "teacher",
    "--data.prompt_dataset", "prompts.jsonl",
]  # fmt: skip


def config(*flags) -> TSDKDConfig:
    return parse_args(BASE + list(flags))[1].objective


def test_no_preset_is_the_config_defaults():
    assert config() == TSDKDConfig()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_values(preset):
    got = config("--tsdkd.preset", preset)
    assert got == TSDKDConfig.from_preset(preset)
    for name, value in PRESETS[preset].items():
        assert getattr(got, name) == value


def test_an_explicit_flag_wins_over_the_preset():
    got = config("--tsdkd.preset", "paper", "--tsdkd.entropy_top_fraction", "0.25", "--tsdkd.beta", "0.5")
    assert (got.entropy_top_fraction, got.beta) == (0.25, 0.5)
    assert (got.direct_reduction, got.entropy_reduction) == ("response", "response")  # the rest of the preset
    # Even a flag that repeats the config's default overrides the preset (it was given).
    got = config(
        "--tsdkd.entropy_top_fraction", "0.9", "--tsdkd.preset", "paper", "--tsdkd.direct_reduction", "micro_batch"
    )
    assert (got.entropy_top_fraction, got.direct_reduction, got.entropy_reduction) == (0.9, "micro_batch", "response")


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        config("--tsdkd.preset", "mine")
    assert "--tsdkd.preset must be one of reference, paper, got 'mine'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], False),
        (["--tsdkd.diagnostics"], True),
        (["--tsdkd.diagnostics", "false"], False),
        (["--tsdkd.preset", "paper", "--tsdkd.diagnostics", "true"], True),
    ],
)
def test_diagnostics_flag(flags, expected):
    assert config(*flags).diagnostics is expected


# ----------------------------------------------------------------------------- the remedies' flags (docs/objective.md)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (False, 0, "none")),
        (["--tsdkd.listmle_normalize"], (True, 0, "none")),  # a bare bool flag is true
        (["--tsdkd.listmle_normalize", "True", "--tsdkd.weight_warmup_steps", "16"], (True, 16, "none")),
        (["--tsdkd.listmle_normalize", "false", "--tsdkd.term_balance", "grad_norm"], (False, 0, "grad_norm")),
        (["--tsdkd.preset", "paper", "--tsdkd.term_balance", "none"], (False, 0, "none")),
    ],
)
def test_remedy_flags(flags, expected):
    got = config(*flags)
    assert (got.listmle_normalize, got.weight_warmup_steps, got.term_balance) == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--tsdkd.term_balance", "gradnorm"],
            "--tsdkd.term_balance must be one of ('none', 'grad_norm'), got 'gradnorm'",
        ),
        (["--tsdkd.weight_warmup_steps", "-2"], "--tsdkd.weight_warmup_steps must be an integer >= 0"),
        (
            ["--tsdkd.listmle_normalize", "maybe"],
            "argument --tsdkd.listmle_normalize: expected true or false, got 'maybe'",
        ),
    ],
)
def test_bad_remedy_flags_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        config(*flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_balance_flag_lists_its_choices_in_the_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--tsdkd.term_balance {none,grad_norm}" in " ".join(capsys.readouterr().out.split())
