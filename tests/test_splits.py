"""Split files: what a run trained on is recorded, reused, checked against the dataset, and evaluation never sees a
training image (`emovlm_kd.data.splitfile`, `emovlm-kd split`, `--splits`)."""

import json
import logging

import pytest
from conftest import random_image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from emovlm_kd.cli import main
from emovlm_kd.data.splitfile import (
    SplitMismatchError,
    apply_splits,
    check_leakage,
    read_splits,
    split_record,
    write_splits,
)


def tiny_dataset(tmp_path, rows):
    """A DatasetDict from {split: [(id, label, seed)]}: one PNG per row, same seed = same content."""
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"]), "id": Value("string")})
    parts = {}
    for split, entries in rows.items():
        paths = []
        for row_id, _, seed in entries:
            path = tmp_path / f"{row_id}.png"
            random_image(8, 8, seed).save(path)
            paths.append(str(path))
        parts[split] = Dataset.from_dict({"image": paths, "label": [e[1] for e in entries],
                                          "id": [e[0] for e in entries]}, features=features)
    return DatasetDict(parts)


@pytest.fixture
def data(tmp_path):
    return tiny_dataset(tmp_path, {"train": [("t0", 0, 0), ("t1", 1, 1), ("t2", 0, 2)],
                                   "test": [("s0", 1, 3), ("s1", 0, 4)]})


def test_a_split_file_round_trips_and_reassigns_rows(data, tmp_path):
    record = split_record(data, "somewhere", seed=7)
    assert record["train"] == ["t0", "t1", "t2"] and record["test"] == ["s0", "s1"]
    assert record["dataset"]["source"] == "somewhere" and record["dataset"]["seed"] == 7
    path = write_splits(tmp_path / "s.json", record)
    moved = dict(read_splits(path), train=["s1", "t0"], test=["t2", "t1", "s0"])
    moved["dataset"] = dict(moved["dataset"], fingerprint=None)  # hand-edited: no fingerprint to check
    result = apply_splits(data, moved)
    assert result["train"]["id"] == ["s1", "t0"] and result["test"]["id"] == ["t2", "t1", "s0"]
    assert result["test"]["label"] == [0, 1, 1]  # labels travel with their rows


def test_a_dataset_that_lost_images_or_changed_labels_no_longer_matches(data, tmp_path):
    record = split_record(data, "d")
    fewer = DatasetDict({"train": data["train"].select([0, 1]), "test": data["test"]})
    with pytest.raises(SplitMismatchError, match="1 of its 5 images are not in it.*'t2'"):
        apply_splits(fewer, record)
    relabelled = DatasetDict({"train": data["train"], "test": data["test"].map(lambda r: {"label": 1 - r["label"]})})
    with pytest.raises(SplitMismatchError, match="other labels"):
        apply_splits(relabelled, record)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": ["a"], "val": ["b"]}, "train, test"),
        ({"train": ["a"], "test": ["a"]}, "'a' is in both train and test"),
        ({"train": ["a"], "test": ["b"], "extra": []}, "train, test"),
    ],
)
def test_bad_split_files_are_refused_naming_the_file(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_splits(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_splits(path)


def test_identical_images_across_splits_are_named_or_refused(tmp_path, caplog):
    data = tiny_dataset(tmp_path, {"train": [("t0", 0, 0), ("t1", 1, 1)], "test": [("s0", 0, 0), ("s1", 1, 2)]})
    with caplog.at_level(logging.WARNING):
        groups = check_leakage(data)
    assert groups == [[("train", "t0"), ("test", "s0")]]
    assert "train:t0 = test:s0" in caplog.text
    with pytest.raises(ValueError, match="train:t0 = test:s0"):
        check_leakage(data, strict=True)
    (tmp_path / "x").mkdir()
    same_split = tiny_dataset(tmp_path / "x", {"train": [("a", 0, 5), ("b", 0, 5)], "test": [("c", 1, 6)]})
    assert check_leakage(same_split) == []  # duplicates inside one split are not leakage


def test_split_command_writes_a_file_that_train_can_reuse(tmp_path, capsys):
    from emovlm_kd.data import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", per_class=(4, 1, 2))
    assert main(["split", str(root), "--output", str(tmp_path / "s.json"), "--seed", "3"]) == 0
    record = read_splits(tmp_path / "s.json")
    assert len(record["train"]) == 32 and len(record["test"]) == 16 and not set(record["train"]) & set(record["test"])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["split", str(tmp_path / "nope"), "--output", str(tmp_path / "t.json")])
    assert exit_info.value.code == 2


def test_train_takes_its_split_from_a_split_file_whatever_its_own_seed(tmp_path):
    """`emovlm-kd train --splits FILE`: the run's data is the file's split, not one drawn with the run's seed."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.training.config import TrainConfig
    from emovlm_kd.training.runner import load_data

    root = make_synthetic_dataset(tmp_path / "d", per_class=(4, 1, 2))
    assert main(["split", str(root), "--output", str(tmp_path / "s.json"), "--seed", "3"]) == 0
    record = read_splits(tmp_path / "s.json")
    dataset = load_data(TrainConfig(dataset=str(root), splits=str(tmp_path / "s.json"), seed=11), str(root))
    assert {name: list(part["id"]) for name, part in dataset.items()} == {
        name: ids for name, ids in record.items() if name != "dataset"}
    record["test"].append("not/in/the/dataset.png")
    write_splits(tmp_path / "bad.json", record)
    with pytest.raises(SplitMismatchError, match="not in it"):
        load_data(TrainConfig(dataset=str(root), splits=str(tmp_path / "bad.json")), str(root))
