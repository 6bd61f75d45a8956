"""The residual command line: --help, exit codes, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

BIN = Path(sys.executable).parent / "residual"


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "units" in out


def test_units_table(capsys):
    assert main(["units", "--model", "residual-tiny"]) == 0
    out = capsys.readouterr().out
    assert "U=21 units" in out and "L3H3" in out and "L0.mlp" in out


def test_user_error_is_one_line_and_exit_2(capsys):
    assert main(["units", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("residual: error: unknown model")


def test_console_script_exit_codes():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([str(BIN), "units", "--model", "ViT-B-32", "--pretrained", "x/y.pt"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "checkpoint file not found" in bad.stderr
    usage = subprocess.run([str(BIN), "frobnicate"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_demo_help_names_the_pipeline(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Pretrain" in out and "--force" in out


def test_one_name_for_one_thing_across_commands():
    """Dask options are --dask-* wherever they appear; --num-workers is DataLoader workers."""
    from pipelines.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    options = {name: {o for a in p._actions for o in a.option_strings}
               for name, p in commands.items()}
    assert {"--dask-address", "--dask-workers"} <= options["spectral"] & options["run"]
    assert "--num-workers" in options["extract"]
    every = set().union(*options.values())
    assert not every & {"--workers", "--address", "--memory-limit"}


def test_force_means_recompute_in_every_command():
    """--force is one option: a flag in a one-stage command, an optional first STAGE in a
    command of several (bare: every stage, by the stage graph)."""
    from pipelines.cli import build_parser
    from residual_core.stages import STAGES, downstream

    parser = build_parser()
    common = ["--model", "residual-tiny", "--dataset", "d"]
    for command in (["spectral", *common], ["align", *common], ["explain", *common]):
        assert parser.parse_args(command).force is False
        assert parser.parse_args([*command, "--force"]).force is True
    for command in (["run"], ["demo"]):
        assert parser.parse_args(command).force == []
        assert downstream(parser.parse_args([*command, "--force"]).force) == set(STAGES)
        assert parser.parse_args([*command, "--force", "align", "--force", "explain"]
                                 ).force == ["align", "explain"]
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--force", "nope"])
