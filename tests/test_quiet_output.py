"""Quiet, useful output (issue 13 item 4): Trainer log dicts in a file (not stdout), --log-level and --quiet on
either side of the subcommand, expected library messages dropped where they are emitted, passive OpenMP waiting."""

import json
import logging
import os

import pytest
import torch

from emovlm_kd.cli import main
from emovlm_kd.logs import route_trainer_logs, setup_logging


@pytest.fixture(autouse=True)
def keep_root_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def tiny_trainer(tmp_path, disable_tqdm):
    from transformers import Trainer, TrainingArguments

    from emovlm_kd.training.trainers import TensorDictDataset

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    data = TensorDictDataset(x=torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), labels=torch.zeros(8))
    args = TrainingArguments(output_dir=str(tmp_path / "stage" / "checkpoints"), max_steps=4, logging_steps=1,
                             per_device_train_batch_size=4, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=disable_tqdm, remove_unused_columns=False)
    return Trainer(model=Regression(), args=args, train_dataset=data)


@pytest.mark.parametrize("disable_tqdm", [True, False])  # PrinterCallback / ProgressCallback print the dicts
def test_trainer_log_dicts_go_to_a_file_not_to_stdout(tmp_path, capsys, disable_tqdm):
    log = tmp_path / "stage" / "trainer_log.jsonl"
    route_trainer_logs(tiny_trainer(tmp_path, disable_tqdm), log).train()
    assert "'loss'" not in capsys.readouterr().out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_log_level_are_accepted_on_either_side_of_the_subcommand(tmp_path, where):
    flags = ["--quiet"]
    argv = [*flags, "tiny", str(tmp_path / "b")] if where == "before" else ["tiny", str(tmp_path / "b"), *flags]
    assert main(argv) == 0
    assert logging.getLogger().level == logging.WARNING
    argv = ["--log-level", "DEBUG", "tiny", str(tmp_path / "c")] if where == "before" else \
        ["tiny", str(tmp_path / "c"), "--log-level", "DEBUG"]
    assert main(argv) == 0
    assert logging.getLogger().level == logging.DEBUG


def test_expected_library_messages_are_dropped_and_others_kept():
    """Through a handler on the loggers themselves (transformers' do not propagate to the root logger)."""
    setup_logging("INFO")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("transformers.trainer_utils",
                                                    "transformers.distributed.tensor_parallel")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        loggers[0].warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
        loggers[1].warning("The following layers were not sharded: a, b")
        loggers[0].warning("something else")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen == ["something else"]


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["tiny", str(tmp_path / "b")]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["tiny", str(tmp_path / "c")]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
