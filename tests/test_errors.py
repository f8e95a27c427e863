"""Exit codes of `emovlm-kd train`: a user's mistake is one line and status 2; a bug keeps its traceback (status 1)."""

import subprocess
import sys
from pathlib import Path

import pytest

from emovlm_kd.cli import main
from emovlm_kd.errors import InputError, UsageError

ROOT = Path(__file__).resolve().parents[1]

# `emovlm-kd train` in a fresh process with stage 0 replaced by one that fails as a bug deep in a stage would
BROKEN_STAGE_DRIVER = """
import sys

import emovlm_kd.training.runner as runner


def broken_stage(*args, **kwargs):
    raise ValueError("a bug deep in stage 0")


runner.run_stage0 = broken_stage
from emovlm_kd.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_input_error_is_a_usage_error_and_a_value_error():
    """Exit 2 through the CLI's `UsageError` branch; library callers that catch `ValueError` still catch it."""
    assert issubclass(InputError, UsageError) and issubclass(InputError, ValueError)


def test_a_value_error_inside_a_stage_keeps_its_traceback_and_exits_1(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", BROKEN_STAGE_DRIVER, "train", "--output-dir", str(run_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: a bug deep in stage 0" in result.stderr
    assert "error: a bug deep in stage 0" not in result.stderr  # not dressed up as a usage error


def test_an_input_error_inside_a_stage_exits_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    import emovlm_kd.training.runner as runner

    def refusing_stage(*args, **kwargs):
        raise InputError("no conversation answers for any train image")

    monkeypatch.setattr(runner, "run_stage0", refusing_stage)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: no conversation answers for any train image" in err and "Traceback" not in err


def test_a_preflight_problem_exits_2_in_one_line(tmp_path):
    missing = tmp_path / "no-such-dataset"
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", "train", "--dataset", str(missing),
                             "--output-dir", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    problem = [line for line in result.stderr.splitlines() if "no such folder" in line]
    assert problem == [f"  --dataset {missing}: no such folder or file"], result.stderr
    assert not (tmp_path / "run").exists()
