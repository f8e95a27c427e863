"""Models checked at load, and no code run from a model folder.

Every damaged bundle the issue lists (and a few more) makes `predict` / `evaluate` exit 3 with one line naming the
file and what is wrong, before any output is opened; a path that does not exist is "no such folder" (exit 2, no
Hub request, fast); a bundle's Python files never run, and `--trust-remote-code` is needed (and enough) for a model
that is not an EmoVLM-KD bundle. Tiny bundle copies, one or two images, CPU.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emovlm_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def bundle(tiny_bundle_dir, tmp_path):
    """A copy of the tiny bundle to damage."""
    return Path(shutil.copytree(tiny_bundle_dir, tmp_path / "model"))


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def keep_labels(config, count):
    """The first `count` labels; a made-up ninth with its own answer (in the vocabulary) past eight."""
    answers = config["label_answer_token_ids"]
    while len(answers) < count:
        answer = list(answers[0])
        answer[-2] = 1 + max(token for ids in answers for token in ids)
        answers.append(answer)
    config["id2label"] = {str(i): config["id2label"].get(str(i), f"label{i}") for i in range(count)}
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    config["label_answer_token_ids"] = answers[:count]


def drop_tensor(folder, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def cut_end(path, count):
    os.truncate(path, path.stat().st_size - count)


def gap_in_id2label(config):
    config["id2label"]["8"] = config["id2label"].pop("3")


def swap_answers(config):
    answers = config["label_answer_token_ids"]
    answers[0], answers[1] = answers[1], answers[0]


DAMAGE = {  # what is done to the bundle, the file the message names, what it says
    "weights truncated": (lambda f: os.truncate(f / "model.safetensors", 1000), "model.safetensors",
                          "not a complete safetensors file"),
    "weights empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors",
                      "not a complete safetensors file"),
    "weights cut in their data": (lambda f: cut_end(f / "model.safetensors", 64), "model.safetensors",
                                  "file not fully covered"),
    "weights deleted": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "a tensor missing": (lambda f: drop_tensor(f, "gate.proj.bias"), "model.safetensors",
                         "1 of the model's tensors are missing (gate.proj.bias)"),
    "7 labels": (lambda f: edit_config(f, lambda c: keep_labels(c, 7)), "model.safetensors",
                 "do not fit config.json (7 labels)"),
    "9 labels": (lambda f: edit_config(f, lambda c: keep_labels(c, 9)), "model.safetensors",
                 "do not fit config.json (9 labels)"),
    "no id2label": (lambda f: edit_config(f, lambda c: [c.pop("id2label"), c.pop("label2id")]), "config.json",
                    "no id2label"),
    "a gap in id2label": (lambda f: edit_config(f, gap_in_id2label), "config.json", "0..7 without a gap: 3 missing"),
    "label2id not its inverse": (lambda f: edit_config(f, lambda c: c["label2id"].update(awe=5)), "config.json",
                                 "label2id does not match id2label for awe"),
    "config not JSON": (lambda f: (f / "config.json").write_text('{"model_type": "emovlm_kd",'), "config.json",
                        "not readable JSON"),
    "answer token outside the vocabulary": (
        lambda f: edit_config(f, lambda c: c["label_answer_token_ids"][2].__setitem__(-2, 10**6)), "config.json",
        "label_answer_token_ids[2] (label 'awe') holds token id 1000000, outside the vocabulary"),
    "fewer answers than labels": (lambda f: edit_config(f, lambda c: c["label_answer_token_ids"].pop()),
                                  "config.json", "7 answers for 8 labels"),
    "answers of other labels": (lambda f: edit_config(f, swap_answers), "config.json",
                                "the tokenizer writes the answer for label 'amusement' as"),
    "tokenizer damaged": (lambda f: (f / "tokenizer.json").write_text("{"), "", "the processor does not load"),
}


def model_error_line(err):
    lines = [line for line in err.splitlines() if "the model could not be loaded" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_predict_refuses_a_damaged_model_with_one_line_and_exit_3(case, bundle, image, tmp_path, capsys):
    damage, file, problem = DAMAGE[case]
    damage(bundle)
    out = tmp_path / "predictions.jsonl"
    out.write_text("an older result\n")
    code = main(["predict", "--model", str(bundle), "--device", "cpu", "--output", str(out), str(image)])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    line = model_error_line(err)
    assert line.startswith(f"emovlm-kd: the model could not be loaded: {bundle / file if file else bundle}: ")
    assert problem in line
    assert "Traceback" not in err
    assert out.read_text() == "an older result\n" and not Path(f"{out}.part").exists()  # nothing was opened


def test_evaluate_refuses_a_damaged_model_before_writing(bundle, tmp_path, capsys):
    from emovlm_kd.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "FI", per_class=(1, 0, 1), image_size=32)
    edit_config(bundle, gap_in_id2label)
    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(bundle), "--dataset", str(data), "--output-dir", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3
    assert f"{bundle / 'config.json'}: id2label ids must be 0..7 without a gap" in model_error_line(err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["FI", "model"]


# ------------------------------------------------------------------------------------------ no such folder


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("name", ["runs/missing", "./missing", "ABSOLUTE", "~/emovlm-kd-no-such-model-42",
                                  "a/b/c"])
def test_a_model_path_that_does_not_exist_is_no_such_folder(command, name, image, tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "missing") if name == "ABSOLUTE" else name
    argv = [str(image)] if command == "predict" else ["--dataset", str(tmp_path), "--output-dir", "out"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", name, *argv])
    assert exit_info.value.code == 2
    assert "--model: no such folder: " in capsys.readouterr().err


def test_a_hub_id_is_asked_for_not_taken_for_a_folder(image, capsys):
    with pytest.raises(SystemExit) as exit_info:  # offline in the tests: the Hub's own error, as a usage error
        main(["predict", "--model", "someone/emovlm-kd-model", str(image)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot load 'someone/emovlm-kd-model'" in err and "no such folder" not in err


def test_no_such_folder_is_said_within_5_seconds(image, tmp_path):
    """A fresh process: the check comes before torch, transformers or the dataset are imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", "predict", "--model", str(tmp_path / "nope"),
                             str(image)], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and f"no such folder: {tmp_path / 'nope'}" in result.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"


# ------------------------------------------------------------------------------------------ no remote code


def plant(folder, marker):
    """Every Python file of the folder writes `marker` when run; the config file then also stops the process."""
    for name in ("modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "scoring_emovlm_kd.py",
                 "configuration_emovlm_kd.py"):
        with open(folder / name, "a", encoding="utf-8") as handle:
            handle.write(f"\nopen({str(marker)!r}, 'a').write({name!r})\n")
    with open(folder / "configuration_emovlm_kd.py", "a", encoding="utf-8") as handle:
        handle.write('raise SystemExit("ran")\n')


@pytest.mark.parametrize("flags", [[], ["--trust-remote-code"]])
def test_predict_and_evaluate_run_no_code_from_a_bundle(flags, bundle, image, tmp_path, capsys):
    """A bundle always loads with the installed classes, with or without --trust-remote-code."""
    from emovlm_kd.data import make_synthetic_dataset

    marker = tmp_path / "marker"
    plant(bundle, marker)
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--model", str(bundle), "--device", "cpu", "--output", str(out), str(image), *flags]) == 0
    assert json.loads(out.read_text())["label"] in json.loads((bundle / "config.json").read_text())["label2id"]
    data = make_synthetic_dataset(tmp_path / "FI", per_class=(1, 0, 1), image_size=32)
    assert main(["evaluate", "--model", str(bundle), "--dataset", str(data), "--output-dir", str(tmp_path / "report"),
                 "--device", "cpu", "--limit", "2", *flags]) == 0
    assert (tmp_path / "report" / "report.json").is_file()
    assert not marker.exists()


def test_trust_remote_code_is_the_opt_in_for_a_model_that_is_not_a_bundle(bundle, image, tmp_path, capsys):
    """A fork of the bundle under another model_type (its code in the folder): refused without the flag, run with
    its own code with it."""
    marker = tmp_path / "marker"
    code_file = bundle / "configuration_emovlm_kd.py"
    code_file.write_text(code_file.read_text().replace('model_type = "emovlm_kd"', 'model_type = "emovlm_kd_fork"'))
    with open(bundle / "modeling_emovlm_kd.py", "a", encoding="utf-8") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'a').write('ran')\n")
    edit_config(bundle, lambda config: config.update(model_type="emovlm_kd_fork"))
    argv = ["predict", "--model", str(bundle), "--device", "cpu", str(image)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "not an EmoVLM-KD bundle" in capsys.readouterr().err and not marker.exists()
    assert main([*argv, "--trust-remote-code"]) == 0
    assert marker.exists()  # its own code ran, as asked
    assert json.loads(capsys.readouterr().out)["path"] == str(image)


def test_a_bundle_from_the_hub_cache_runs_none_of_its_code(tiny_bundle_dir, image, tmp_path, monkeypatch, capsys):
    """A Hub id (offline: a snapshot in the Hub cache) is checked and loaded like a folder, its Python files unused."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-emovlm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = Path(shutil.copytree(tiny_bundle_dir, repo / "snapshots" / commit))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    marker = tmp_path / "marker"
    plant(snapshot, marker)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["predict", "--model", "someone/tiny-emovlm", "--device", "cpu", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(image)
    assert not marker.exists()
