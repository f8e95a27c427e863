"""Each of the paper's five datasets, in the form its authors distribute it, trains end to end with its paper
config and the tiny models, writes RUN/splits.json, and `emovlm-kd evaluate --model RUN/model` predicts exactly
the run's test ids, none of which was trained on (also with unreadable files, a non-default seed, and `table1`)."""

import json

import pytest
from dataset_fixtures import write_emoset, write_emotion6, write_fi, write_flickr, write_instagram

from emovlm_kd.cli import main

WRITERS = {
    "fi": lambda root: write_fi(root, per_class=6),
    "emoset": lambda root: write_emoset(root, per_class=(4, 1, 2)),
    "emotion6": lambda root: write_emotion6(root, per_class=6),
    "flickr": lambda root: write_flickr(root, per_label=8, missing=1),
    "instagram": lambda root: write_instagram(root, per_label=8),
}
SMALL = ["--vlm", "demo", "--teacher", "demo", "--sft-epochs", "1", "--sft-batch-size", "8", "--teacher-epochs", "1",
         "--teacher-batch-size", "16", "--distill-epochs", "2", "--gate-epochs", "2", "--head-hidden-sizes", "32",
         "--batch-size", "16", "--instruction-kinds", "categorical", "--gate-samples", "2"]


def train(config, root, out, *extra):
    assert main(["train", "--config", config, "--dataset", str(root), "--output-dir", str(out), *SMALL, *extra]) == 0
    return json.loads((out / "splits.json").read_text())


def predicted_ids(folder):
    return [json.loads(line)["id"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_paper_dataset_trains_and_evaluates_on_exactly_the_runs_test_ids(name, tmp_path):
    root = WRITERS[name](tmp_path / name)
    out = tmp_path / "run"
    splits = train(name, root, out)
    assert splits["test"] and not set(splits["test"]) & set(splits["train"])
    assert json.loads((out / "model" / "splits.json").read_text()) == splits  # the model knows its split
    assert main(["evaluate", "--model", str(out / "model"), "--dataset", str(root),
                 "--output-dir", str(tmp_path / "eval")]) == 0
    assert predicted_ids(tmp_path / "eval") == splits["test"]


@pytest.mark.timeout(900)
def test_no_training_image_is_evaluated_with_unreadable_files_and_another_seed(tmp_path):
    """The issue's case: a non-default seed and a corrupt file; `train`, `evaluate` and `table1` agree on the ids."""
    root = write_fi(tmp_path / "FI", per_class=6)
    (root / "anger" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    splits = train("fi", root, out, "--seed", "7")
    assert not set(splits["test"]) & set(splits["train"]) and "anger/broken.jpg" not in json.dumps(splits)
    assert main(["evaluate", "--model", str(out / "model"), "--dataset", str(root),
                 "--output-dir", str(tmp_path / "eval")]) == 0
    assert predicted_ids(tmp_path / "eval") == splits["test"]
    assert main(["table1", "--model", f"fi={out / 'model'}", "--dataset", f"fi={root}",
                 "--output-dir", str(tmp_path / "table1")]) == 0
    assert predicted_ids(tmp_path / "table1" / "fi") == splits["test"]
    # the same split shared as a file and reused: another seed on the command line does not change it
    assert main(["evaluate", "--model", str(out / "model"), "--dataset", str(root), "--splits",
                 str(out / "splits.json"), "--seed", "1", "--output-dir", str(tmp_path / "eval2")]) == 0
    assert predicted_ids(tmp_path / "eval2") == splits["test"]


def test_evaluate_refuses_a_dataset_that_no_longer_matches_the_runs_split(tmp_path, capsys):
    root = write_fi(tmp_path / "FI", per_class=6)
    out = tmp_path / "run"
    splits = train("fi", root, out)
    (root / splits["test"][0]).unlink()  # an evaluated image is gone
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(out / "model"), "--dataset", str(root), "--output-dir", str(tmp_path / "e")])
    assert exit_info.value.code == 2
    assert "no longer matches" in capsys.readouterr().err
