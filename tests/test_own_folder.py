"""A user's own folder and paths (issue 21 items 2 and 4): `train --dataset DIR` with the embedded tiny models and
nothing synthetic; an unlabelled folder refused with nothing written; every input resolved in one round, in seconds,
with one Hub probe; a run folder given as `--model` pointed to its model/."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emovlm_kd.cli import main
from emovlm_kd.training.config import DEMO, parse_train_args

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def class_folders(root, classes=("calm", "happy", "sad"), per_class=8):
    """A plain class-folder dataset `root/<class>/*.png` as a user makes one (the layout `datasets`' imagefolder
    documents: https://huggingface.co/docs/datasets/image_dataset#imagefolder), with learnable images (the synthetic
    generator's, one class per hue) moved out of its split folders."""
    from emovlm_kd.data import make_synthetic_dataset

    source = make_synthetic_dataset(root.parent / f".{root.name}-source", labels=classes, per_class=(per_class, 0, 0),
                                    label_noise=0.0)
    for image in sorted((source / "train").glob("*/*.png")):
        (root / image.parent.name).mkdir(parents=True, exist_ok=True)
        image.rename(root / image.parent.name / image.name)
    return root


def run_cli(argv, capsys):
    """`emovlm-kd ARGV` in this process: (exit status, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Item 2: the embedded models on the user's own folder
# ---------------------------------------------------------------------------------------------------------------


def test_a_users_dataset_does_not_take_the_demos_data_settings(tmp_path, monkeypatch):
    """demo.yaml's settings of its synthetic data (its reasoning answers, runs/demo) stay with `--dataset demo`."""
    monkeypatch.chdir(tmp_path)
    class_folders(tmp_path / "mydata", per_class=1)
    cfg = parse_train_args(["--dataset", "mydata"])
    assert (cfg.vlm, cfg.teacher) == (DEMO, DEMO)  # the embedded tiny models and the demo's training settings
    assert (cfg.instructions, cfg.instruction_kinds, cfg.output_dir) == (None, ["categorical"], "runs/mydata")
    assert parse_train_args(["--dataset", "mydata", "--instruction-kinds", "categorical"]).instructions is None
    assert parse_train_args(["--dataset", "mydata/", "--output-dir", "r"]).output_dir == "r"
    assert parse_train_args(["--dataset", "someone/emotions"]).output_dir == "runs/emotions"
    demo = parse_train_args([])
    assert (demo.instructions, demo.instruction_kinds, demo.output_dir) == (DEMO, ["categorical", "reasoning"],
                                                                           "runs/demo")


def test_train_on_a_plain_class_folder_with_no_other_flag(tmp_path, monkeypatch, capsys, caplog):
    """`emovlm-kd train --dataset mydata`, the first thing a user types: the embedded tiny models, the categorical
    instructions, one line saying so, a model in runs/mydata, and not one synthetic dataset image in the run."""
    monkeypatch.chdir(tmp_path)
    class_folders(tmp_path / "mydata")
    with caplog.at_level("INFO", logger="emovlm_kd.training.config"):
        code, err = run_cli(["train", "--dataset", "mydata"], capsys)
    assert code == 0, err[-2000:]
    (note,) = [record.getMessage() for record in caplog.records if record.name == "emovlm_kd.training.config"]
    assert "embedded tiny VLM and teacher" in note and "categorical instructions only" in note
    assert "--instructions" in note and "--annotator" in note
    run = tmp_path / "runs" / "mydata"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mydata"]  # not runs/demo
    assert (run / "model" / "config.json").is_file() and (run / "eval_results.json").is_file()
    settings = json.loads((run / "train_config.json").read_text())
    assert (settings["instructions"], settings["instruction_kinds"]) == (None, ["categorical"])
    assert not (run / "data").exists()  # the demo's synthetic dataset: not written
    images = [p.relative_to(run) for p in run.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    assert images == [], images  # no synthetic picture at all: not even the demo's widget examples
    card = (run / "model" / "README.md").read_text()
    assert "widget:" not in card


def test_an_unlabelled_folder_is_refused_with_nothing_written(tmp_path, monkeypatch, capsys):
    """Images without labels (a flat folder): refused by the preflight, before the run folder exists."""
    monkeypatch.chdir(tmp_path)
    labelled = class_folders(tmp_path / "labelled", per_class=2)
    (tmp_path / "flat").mkdir()
    for image in labelled.rglob("*.png"):
        image.rename(tmp_path / "flat" / image.name)
    code, err = run_cli(["train", "--dataset", "flat"], capsys)
    assert code == 2
    assert "cannot start the run" in err and "--dataset flat:" in err and "label" in err
    assert "Traceback" not in err and "Stage" not in err
    assert not (tmp_path / "runs").exists()  # no train_config.json, no lock, no tiny models, no synthetic images


# ---------------------------------------------------------------------------------------------------------------
# Item 4: one round of answers, in seconds, one Hub probe
# ---------------------------------------------------------------------------------------------------------------


def no_network_env(tmp_path, offline):
    """The environment of a user without network: HF_HUB_OFFLINE=1, or unset with a Hub that refuses connections
    (as a machine without network; the endpoint makes it so where there is one)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    env.update({"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": CLOSED})
    return env


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
@pytest.mark.parametrize("command", [["split", "data/FI", "--output", "fi.json"],
                                     ["evaluate", "--model", "Qwen/Qwen2-VL-7B-Instruct", "--dataset", "data/FI",
                                      "--output-dir", "results/fi"]], ids=["split", "evaluate"])
def test_the_readmes_path_that_does_not_exist_yet_fails_in_seconds_naming_both_causes(tmp_path, command, offline):
    """`data/FI` (the README's example, a folder the user has not made yet) is neither a folder nor reachable on the
    Hub: one answer naming both, in under 5 s, without the Hub client's retries."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", *command], cwd=tmp_path,
                            env=no_network_env(tmp_path, offline), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "--dataset data/FI:" in line]
    assert f"no such folder ({tmp_path / 'data' / 'FI'}) and not reachable on the Hub" in line
    assert ("HF_HUB_OFFLINE is set" if offline else f"no connection to {CLOSED}") in line
    assert "pass the folder that holds the dataset" in line and "hf download" not in line
    assert "Retrying" not in result.stderr and "--split" not in result.stderr and "Traceback" not in result.stderr
    if command[0] == "evaluate":
        assert "--model Qwen/Qwen2-VL-7B-Instruct: no such folder, and not in the local Hub cache" in result.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"


def test_train_with_the_fi_config_reports_every_problem_in_one_round(tmp_path, monkeypatch, capsys):
    """Instruction data, dataset, VLM and teacher: all four in one answer, in the order of the flags."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    code, err = run_cli(["train", "--config", "fi"], capsys)
    assert code == 2
    lines = err.split("cannot start the run:\n", 1)[1].splitlines()
    assert [line.strip().split(":")[0] for line in lines] == [
        "the instruction mix (categorical conversation reasoning) needs conversation and reasoning answers and none "
        "were given", "--dataset data/FI", "--vlm Qwen/Qwen2-VL-7B-Instruct", "--teacher google/vit-base-patch16-384"]
    assert "not reachable on the Hub" in lines[1] and "hf download data/FI" not in err
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_given_as_model_points_at_its_model(tmp_path, monkeypatch, capsys):
    """`--model runs/demo` (the run folder, which holds model/): the answer names runs/demo/model."""
    from emovlm_kd.modelcheck import read_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model" / "config.json").write_text("{}")
    class_folders(tmp_path / "mydata", per_class=1)
    code, err = run_cli(["evaluate", "--model", "runs/demo", "--dataset", "mydata", "--output-dir", "out"], capsys)
    assert code == 2
    assert "--model runs/demo: no config.json in this folder" in err
    assert "its model is runs/demo/model" in err
    with pytest.raises(FileNotFoundError, match="its model is runs/demo/model"):  # predict, demo: the same hint
        read_config("runs/demo")


@pytest.mark.parametrize("kind", ["a file of text", "a folder"])
def test_a_lock_named_file_of_the_users_in_the_run_folder_is_refused_and_kept(kind, tmp_path, monkeypatch, capsys):
    """`--output-dir` holding a `.lock` that is not a run lock of ours (notes, a folder): refused in one line, exit 2,
    the user's `.lock` byte for byte as it was (the run lock's file is never truncated unless it is ours)."""
    monkeypatch.chdir(tmp_path)
    class_folders(tmp_path / "mydata", per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    if kind == "a folder":
        (out / ".lock").mkdir()
        (out / ".lock" / "mine.txt").write_text("mine\n")
    else:
        (out / ".lock").write_text("my notes on locks\n")
    code, err = run_cli(["train", "--dataset", "mydata", "--output-dir", "out"], capsys)
    assert code == 2, err[-2000:]
    assert "out/.lock is not a lock file of this project" in err and "Traceback" not in err
    if kind == "a folder":
        assert (out / ".lock" / "mine.txt").read_text() == "mine\n"
    else:
        assert (out / ".lock").read_text() == "my notes on locks\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
