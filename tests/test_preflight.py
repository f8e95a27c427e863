"""`train` resolves every input before any work, in seconds, one line per problem (issue 13 item 2)."""

import os
import subprocess
import sys

import pytest

from emovlm_kd import hubaccess
from emovlm_kd.training.config import TrainConfig
from emovlm_kd.training.preflight import PreflightError, looks_like_path, preflight, problems

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def no_hub(monkeypatch):
    """A Hub endpoint that refuses connections, and an empty Hub cache and token store."""
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", CLOSED)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", "/nonexistent-hub-cache")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def settings(tmp_path, **values):
    return TrainConfig(**{"output_dir": str(tmp_path / "run"), "instruction_kinds": ["categorical"], **values})


def model_folder(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_the_demo_needs_nothing(tmp_path, no_hub):
    assert problems(settings(tmp_path)) == []


def test_a_missing_local_folder_says_no_such_folder_without_asking_the_hub(tmp_path, no_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(hubaccess, "connectable", lambda *a, **k: pytest.fail("the Hub was asked"))
    cfg = settings(tmp_path, vlm="runs/nope", teacher=str(tmp_path / "teacher"), dataset="./data/FI")
    assert problems(cfg) == ["--dataset ./data/FI: no such folder or file", "--vlm runs/nope: no such folder",
                             f"--teacher {tmp_path / 'teacher'}: no such folder"]


def test_a_folder_that_is_not_a_model_is_named(tmp_path, no_hub):
    (tmp_path / "empty").mkdir()
    assert problems(settings(tmp_path, vlm=str(tmp_path / "empty"))) == [
        f"--vlm {tmp_path / 'empty'}: no config.json in this folder (not a transformers model folder)"]


def test_without_network_hub_names_fail_once_with_the_way_out(tmp_path, no_hub, monkeypatch):
    """One connection attempt for both names (no retries), and each line says how to use a local copy."""
    probes = []
    real = hubaccess.connectable
    monkeypatch.setattr(hubaccess, "connectable", lambda url, **kw: probes.append(url) or real(url, **kw))
    cfg = settings(tmp_path, vlm="Qwen/Qwen2-VL-7B-Instruct", teacher="google/vit-base-patch16-384")
    with pytest.raises(PreflightError) as error:
        preflight(cfg)
    assert probes == [CLOSED]
    assert [line.split(":")[0] for line in error.value.problems] == ["--vlm Qwen/Qwen2-VL-7B-Instruct",
                                                                     "--teacher google/vit-base-patch16-384"]
    assert f"the Hub ({CLOSED}) is unreachable" in error.value.problems[0]
    assert "hf download Qwen/Qwen2-VL-7B-Instruct --local-dir DIR" in error.value.problems[0]


def test_offline_mode_is_named(tmp_path, no_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (line,) = problems(settings(tmp_path, vlm="Qwen/Qwen2-VL-7B-Instruct"))
    assert "HF_HUB_OFFLINE is set" in line


def test_the_annotator_endpoint_and_the_push_are_checked(tmp_path, no_hub):
    cfg = settings(tmp_path, annotator="openai", annotator_url=CLOSED + "/v1", annotator_model="m",
                   instruction_kinds=["categorical", "conversation"], push_to_hub="me/emovlm-kd")
    assert problems(cfg) == [f"--annotator-url {CLOSED}/v1: no connection within 3 s",
                             "--push-to-hub me/emovlm-kd: no Hub token; log in (`hf auth login`) or set HF_TOKEN"]


def test_a_model_folder_holding_the_users_files_is_refused_before_training(tmp_path, no_hub):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "notes.txt").write_text("mine")
    (line,) = problems(settings(tmp_path))
    assert "notes.txt" in line and "choose another --output-dir" in line


@pytest.mark.parametrize("name, is_path", [("Qwen/Qwen2-VL-7B-Instruct", False), ("gpt2", False),
                                           ("./model", True), ("/abs/model", True), ("~/model", True),
                                           ("a/b/c", True), ("C:/models/x", True)])
def test_what_looks_like_a_path(name, is_path):
    assert looks_like_path(name) is is_path


def test_train_with_an_unreachable_teacher_stops_before_any_work_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", "train", "--output-dir", str(out),
                             "--teacher", "google/vit-base-patch16-384"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("--teacher google/vit-base-patch16-384: no such folder, and not in the local Hub cache and HF_HUB_OFFLINE "
            "is set") in result.stderr
    assert "Stage" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # no train_config.json, no lock, no demo inputs: nothing of a run that did not start


@pytest.mark.parametrize("config, epochs, lr, head", [(None, "3.0", "0.005", "[64]"), ("fi", "5.0", "0.0001", "[1024]")])
def test_help_shows_the_defaults_that_apply_with_that_config(capsys, config, epochs, lr, head):
    """`train --help` (the demo) and `train --config fi --help` show each their own values (issue 13 item 5)."""
    import re

    from emovlm_kd.training.config import parse_train_args

    with pytest.raises(SystemExit):
        parse_train_args([*(["--config", config] if config else []), "--help"])
    text = " ".join(capsys.readouterr().out.split())

    def shown(flag):
        return re.search(rf"--{flag} \S+ (?:(?!--).)*?default: ([^\s)]+)", text).group(1)  # within its own entry

    assert (shown("sft-epochs"), shown("sft-lr")) == (epochs, lr)
    assert text.split("--head-hidden-sizes")[-1].split("default: ")[1].startswith(head)  # its entry, after the usage
