"""emovlm_kd.data: every dataset layout to one DatasetDict (image, label, id); splits, bad files, synthetic data."""

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

import emovlm_kd.data as data  # noqa: E402
import emovlm_kd.data.checks as checks  # noqa: E402
from emovlm_kd.labels import EKMAN6, MIKELS8, SENTIMENT2  # noqa: E402
from emovlm_kd.data import load_image_dataset, make_synthetic_dataset, stratified_split  # noqa: E402
from dataset_fixtures import make_split_folders, write_image  # noqa: E402

EMOSET_ORDER = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]
COLUMNS = ["image", "label", "id"]


def names_of(dataset):
    return dataset.features["label"].names


def string_labels(dataset):
    return [names_of(dataset)[label] for label in dataset["label"]]


def check_columns(dataset_dict):
    for dataset in dataset_dict.values():
        assert dataset.column_names == COLUMNS
        assert isinstance(dataset.features["image"], Image) and dataset.features["image"].decode
        assert isinstance(dataset.features["label"], ClassLabel)
        assert dataset.features["id"] == Value("string")


def file_digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.png")}


# --------------------------------------------------------------------------------------------- stratified_split


def test_stratified_split_is_deterministic_stratified_and_complete():
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 2 + ["d"]
    keep, split = stratified_split(labels, 0.1, seed=3)
    assert (keep, split) == stratified_split(labels, 0.1, seed=3)
    assert sorted(keep + split) == list(range(len(labels))) and not set(keep) & set(split)
    assert sorted(labels[i] for i in split) == ["a", "a", "b", "c"]  # c (2 items) gives one, d (1 item) none
    assert stratified_split(labels, 0.1, seed=4) != (keep, split)


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(["a", "b"], 1.0, seed=0)


# ------------------------------------------------------------------------------------------- official layout


def test_official_layout_derives_a_deterministic_stratified_val(tmp_path):
    counts = {"train": {"zeta": 10, "Alpha": 10, "mid": 20}, "test": {"zeta": 2, "Alpha": 2, "mid": 2}}
    root = make_split_folders(tmp_path / "fi", counts)
    result = load_image_dataset(root)
    check_columns(result)
    assert list(result) == ["train", "val", "test"]
    assert names_of(result["train"]) == ["alpha", "mid", "zeta"]  # unknown label set: normalised and sorted
    assert sorted(string_labels(result["val"])) == ["alpha", "mid", "mid", "zeta"]
    assert (result["train"].num_rows, result["test"].num_rows) == (36, 6)
    train_ids, val_ids = set(result["train"]["id"]), set(result["val"]["id"])
    assert not train_ids & val_ids and len(train_ids | val_ids) == 40
    assert "train/Alpha/0.png" in train_ids | val_ids and result["test"][0]["id"].startswith("test/Alpha/")
    assert isinstance(result["test"][0]["image"], PILImage.Image)
    again = load_image_dataset(root)
    assert again["val"]["id"] == result["val"]["id"] and again["train"]["id"] == result["train"]["id"]
    assert load_image_dataset(root, seed=1)["val"]["id"] != result["val"]["id"]


def test_official_layout_keeps_its_val_and_can_skip_deriving_one(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    assert {split: ds.num_rows for split, ds in load_image_dataset(root).items()} == {"train": 8, "val": 2}
    root = make_split_folders(tmp_path / "e", {"train": {"a": 4, "b": 4}})
    assert list(load_image_dataset(root, val_fraction=0)) == ["train"]


@pytest.mark.parametrize("known", [MIKELS8, EKMAN6, SENTIMENT2])
def test_known_label_sets_keep_their_documented_order(tmp_path, known):
    folders = {name.capitalize() if i % 2 else name: 2 for i, name in enumerate(reversed(known))}
    root = make_split_folders(tmp_path / "d", {"train": folders, "test": folders})
    result = load_image_dataset(root)
    assert names_of(result["train"]) == list(known)
    assert [row_id.split("/")[1].lower() for row_id in result["test"]["id"]] == string_labels(result["test"])


def test_label_names_force_the_order_and_reject_other_labels(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    result = load_image_dataset(root, label_names=["B", "c", "a"])
    assert names_of(result["train"]) == ["b", "c", "a"] and string_labels(result["test"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"label 'b' of .*b/0\.png"):
        load_image_dataset(root, label_names=["a"])


# ---------------------------------------------------------------------------------------------------- EmoSet


@pytest.mark.parametrize("row_items", [3, 4])
def test_emoset_layout(tmp_path, row_items):
    root = tmp_path / "EmoSet-118K"
    root.mkdir()
    # the real nesting (github JingyuanYY/EmoSet, info.json): info[attribute]["label2idx"] / ["idx2label"]
    info = {"emotion": {"label2idx": {name: i for i, name in enumerate(EMOSET_ORDER)},
                        "idx2label": {str(i): name for i, name in enumerate(EMOSET_ORDER)}},
            "brightness": {"label2idx": {"0.1": 0}, "idx2label": {"0": 0.1}}}  # fmt: skip
    (root / "info.json").write_text(json.dumps(info))
    for split, per_class in [("train", 2), ("val", 1), ("test", 1)]:
        rows = []
        for emotion in ("fear", "awe"):
            for i in range(per_class):
                image = f"image/{emotion}/{emotion}_{split}{i}.jpg"
                write_image(root / image, format="JPEG")
                row = [emotion, f"{emotion}_{split}{i}", image, f"annotation/{emotion}/{emotion}_{split}{i}.json"]
                rows.append(row if row_items == 4 else [row[0], *row[2:]])
        (root / f"{split}.json").write_text(json.dumps(rows))
    result = load_image_dataset(root)
    check_columns(result)
    assert {split: ds.num_rows for split, ds in result.items()} == {"train": 4, "val": 2, "test": 2}
    assert names_of(result["train"]) == list(MIKELS8)  # canonical, not info.json's index order
    assert result["val"]["id"] == ["image/fear/fear_val0.jpg", "image/awe/awe_val0.jpg"]
    assert string_labels(result["val"]) == ["fear", "awe"]


def test_emoset_rejects_a_malformed_row(tmp_path):
    root = tmp_path / "emoset"
    root.mkdir()
    (root / "info.json").write_text(json.dumps({"emotion": {"label2idx": {"awe": 0}, "idx2label": {"0": "awe"}}}))
    (root / "train.json").write_text(json.dumps([["awe", "image/awe/1.jpg"]]))
    with pytest.raises(ValueError, match="train.json row 0"):
        load_image_dataset(root)


# -------------------------------------------------------------------------------------------------- Emotion6


def test_emotion6_label_is_the_argmax_and_split_80_10_10(tmp_path):
    root = tmp_path / "Emotion6"
    lines = ["[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t[prob. fear]\t[prob. joy]"
             "\t[prob. sadness]\t[prob. surprise]\t[prob. neutral]"]  # fmt: skip
    for k, emotion in enumerate(EKMAN6):
        for i in range(1, 11):
            write_image(root / "images" / emotion / f"{i}.jpg", colour=(40 * k, 20 * i, 0), format="JPEG")
            probs = [0.0] * 7
            probs[k], probs[6] = 0.5, 0.9 if i == 1 else 0.1  # neutral is ignored, even when it is the highest
            lines.append("\t".join([f"{emotion}/{i}.jpg", "5.0", "4.0", *map(str, probs)]))
    lines[1] = "\t".join(["anger/1.jpg", "5", "4", "0.1", "0", "0", "0.6", "0", "0", "0.3"])  # folder says anger
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    result = load_image_dataset(root, emotion6_labels="argmax")  # the default is the folder (the paper's labels)
    check_columns(result)
    assert names_of(result["train"]) == list(EKMAN6)
    assert {split: ds.num_rows for split, ds in result.items()} == {"train": 48, "val": 6, "test": 6}
    labels = {row_id: label for split in result.values() for row_id, label in zip(split["id"], string_labels(split))}
    assert len(labels) == 60 and labels["images/anger/1.jpg"] == "joy" and labels["images/fear/1.jpg"] == "fear"
    assert sorted(string_labels(result["test"])) == sorted(EKMAN6[:3] + ("joy",) + EKMAN6[4:])
    assert load_image_dataset(root, emotion6_labels="argmax")["test"]["id"] == result["test"]["id"]


# ------------------------------------------------------------------------------------------------- manifests


def test_csv_manifest_with_split_column(tmp_path):
    rows = [("imgs/a0.png", "Positive", "train"), ("imgs/a1.png", "negative", "train"),
            ("imgs/a2.png", "positive", "validation"), ("imgs/a3.png", "negative ", "test")]  # fmt: skip
    for path, *_ in rows:
        write_image(tmp_path / path)
    with open(tmp_path / "flickr.csv", "w", newline="") as file:
        csv.writer(file).writerows([("path", "label", "split"), *rows])
    result = load_image_dataset(tmp_path / "flickr.csv")
    check_columns(result)
    assert names_of(result["train"]) == ["negative", "positive"]
    assert {split: ds["id"] for split, ds in result.items()} == {
        "train": ["imgs/a0.png", "imgs/a1.png"], "val": ["imgs/a2.png"], "test": ["imgs/a3.png"]}  # fmt: skip


def test_jsonl_manifest_without_split_is_split_80_10_10(tmp_path):
    lines = []
    for label in ("calm", "tense"):
        for i in range(10):
            write_image(tmp_path / "pics" / f"{label}{i}.png")
            lines.append(json.dumps({"image": f"pics/{label}{i}.png", "label": label}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    result = load_image_dataset(tmp_path / "m.jsonl")
    assert {split: ds.num_rows for split, ds in result.items()} == {"train": 16, "val": 2, "test": 2}
    assert sorted(string_labels(result["val"])) == ["calm", "tense"]


def test_manifest_rejects_an_unknown_split(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "x.png", "label": "a", "split": "holdout"}))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        load_image_dataset(tmp_path / "m.jsonl")


# ------------------------------------------------------------------------------------------ save_to_disk folders


def test_save_to_disk_dataset_dict_with_classlabel(tmp_path):
    features = Features({"picture": Image(), "emotion": ClassLabel(names=EMOSET_ORDER), "extra": Value("int32")})
    pictures = [PILImage.new("RGB", (8, 8), (i * 30, 0, 0)) for i in range(4)]

    def split(labels):
        rows = {"picture": pictures[: len(labels)], "emotion": labels, "extra": list(range(len(labels)))}
        return Dataset.from_dict(rows, features=features)

    splits = {"train": split([0, 4, 7, 1]), "validation": split([5, 2]), "test": split([6])}
    DatasetDict(splits).save_to_disk(tmp_path / "hub")
    result = load_image_dataset(tmp_path / "hub")
    check_columns(result)
    assert list(result) == ["train", "val", "test"]
    assert names_of(result["train"]) == list(MIKELS8)
    assert string_labels(result["train"]) == ["amusement", "anger", "sadness", "awe"]
    assert result["val"]["id"] == ["validation/0", "validation/1"]
    assert string_labels(result["val"]) == ["disgust", "contentment"]
    assert result["train"][1]["image"].getpixel((0, 0)) == (30, 0, 0)


def test_save_to_disk_dataset_with_string_labels_derives_val(tmp_path):
    labels = ["Happy", "sad"] * 10
    images = [PILImage.new("RGB", (8, 8), (i, 0, 0)) for i in range(20)]
    Dataset.from_dict({"img": images, "labels": labels}).save_to_disk(tmp_path / "one")
    result = load_image_dataset(tmp_path / "one", seed=0)
    assert {split: ds.num_rows for split, ds in result.items()} == {"train": 18, "val": 2}
    assert names_of(result["val"]) == ["happy", "sad"] and sorted(string_labels(result["val"])) == ["happy", "sad"]
    assert set(result["train"]["id"]) | set(result["val"]["id"]) == {f"train/{i}" for i in range(20)}
    with pytest.raises(ValueError, match="label 'sad' of row train/1"):
        load_image_dataset(tmp_path / "one", label_names=["happy"])


def test_save_to_disk_with_path_column_checks_the_files(tmp_path, caplog):
    rows = {"path": ["files/a.png", "files/b.png", "files/bad.png"], "label": ["x", "y", "y"]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    write_image(tmp_path / "ds" / "files" / "a.png")  # relative paths: relative to the dataset folder
    write_image(tmp_path / "ds" / "files" / "b.png")
    (tmp_path / "ds" / "files" / "bad.png").write_bytes(b"")
    result = load_image_dataset(tmp_path / "ds", label_column="label", image_column="path", val_fraction=0)
    assert result["train"]["id"] == ["train/0", "train/1"] and "train/2 (empty file)" in caplog.text


# ------------------------------------------------------------------------------------- bad files and errors


def test_unreadable_files_are_skipped_with_one_warning_each_checked_once(tmp_path, caplog, monkeypatch):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    (root / "train/a/empty.jpg").write_bytes(b"")
    png = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible: IDAT is cut
    PILImage.fromarray(noise).save(png, format="PNG")
    (root / "train/b/truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "train/b/text.png").write_text("not an image at all\n")
    (root / "train/b/notes.txt").write_text("ignored: not an image extension\n")
    calls, real = [], checks.load_image_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(checks, "load_image_file", counting)
    with caplog.at_level(logging.WARNING, logger="emovlm_kd.data"):
        result = load_image_dataset(root, val_fraction=0)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "Skipped 3 unreadable" in message
    for name in ("train/a/empty.jpg", "train/b/truncated.png", "train/b/text.png"):
        assert name in message
    assert result["train"].num_rows == 6 and result["test"].num_rows == 2
    assert len(calls) == len(set(calls)) == 11


def test_the_warning_names_at_most_ten_files(tmp_path, caplog):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    for i in range(12):
        (root / f"train/a/bad{i:02d}.png").write_bytes(b"")
    load_image_dataset(root, val_fraction=0)
    assert "Skipped 12 unreadable" in caplog.text and "bad09.png" in caplog.text and "bad10.png" not in caplog.text
    assert caplog.text.rstrip().endswith("...")


def test_a_progress_bar_shows_for_many_files_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    import sys

    root = make_split_folders(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    monkeypatch.setattr(checks, "PROGRESS_MIN_FILES", 3)
    load_image_dataset(root)
    assert "Checking images" not in capsys.readouterr().err  # no terminal: no `\r` lines in a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_image_dataset(root)
    assert "Checking images" in capsys.readouterr().err
    monkeypatch.setattr(checks, "PROGRESS_MIN_FILES", 4)
    load_image_dataset(root)
    assert "Checking images" not in capsys.readouterr().err


def test_a_class_left_without_readable_images_raises(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 2}})
    (root / "train/b").mkdir()
    (root / "train/b/broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\] in split 'train' have no readable images"):
        load_image_dataset(root)


def test_an_empty_class_folder_raises_before_checking_images(tmp_path, monkeypatch):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 2}})
    (root / "train/b").mkdir()
    monkeypatch.setattr(checks, "load_image_file", lambda path: pytest.fail("checked images before the listing"))
    with pytest.raises(ValueError, match=r"class folder\(s\) \['b'\] hold no image files"):
        load_image_dataset(root)


def test_an_empty_split_raises(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": {"a": 2}})
    (root / "test/a").mkdir(parents=True)
    with pytest.raises(ValueError, match="split 'test' has no images"):
        load_image_dataset(root)
    (root / "test/a/gone.png").write_bytes(b"")
    with pytest.raises(ValueError, match="split 'test' has no readable images"):
        load_image_dataset(root)


def test_a_missing_root_raises(tmp_path):
    with pytest.raises(ValueError, match="dataset root not found"):
        load_image_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dataset root not found"):
        load_image_dataset(str(tmp_path / "nowhere"))


def test_a_folder_of_no_known_layout_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no known layout"):
        load_image_dataset(tmp_path / "empty")


def test_an_unreachable_hub_id_raises_a_value_error():
    with pytest.raises(ValueError, match="cannot be loaded as a Hub dataset"):
        load_image_dataset("no-such-owner-xyz/no-such-dataset-xyz")


# -------------------------------------------------------------------------------------------- synthetic data


def test_synthetic_dataset_is_deterministic_and_has_the_right_counts(tmp_path):
    first = make_synthetic_dataset(tmp_path / "one")
    second = make_synthetic_dataset(tmp_path / "two")
    assert file_digests(first) == file_digests(second)
    counts = {split: {c: len(list((first / split / c).glob("*.png"))) for c in MIKELS8} for split in data.SPLITS}
    assert counts["val"] == dict.fromkeys(MIKELS8, 6) and counts["test"] == dict.fromkeys(MIKELS8, 8)
    assert sum(counts["train"].values()) == 8 * 24 and set(counts["train"].values()) != {24}  # label noise moved some
    sizes = {PILImage.open(p).size for p in first.rglob("*.png")}
    assert min(min(s) for s in sizes) >= 40 and max(max(s) for s in sizes) <= 64
    assert any(w != h for w, h in sizes) and len(sizes) > 20
    assert file_digests(make_synthetic_dataset(tmp_path / "three", seed=1)) != file_digests(first)


def test_synthetic_held_out_noise_moves_val_and_test_labels_only(tmp_path):
    clean = make_synthetic_dataset(tmp_path / "clean", labels=("x", "y", "z"), per_class=(8, 10, 10))
    noisy = make_synthetic_dataset(tmp_path / "noisy", labels=("x", "y", "z"), per_class=(8, 10, 10),
                                   held_out_noise=0.1)
    assert file_digests(clean / "train") == file_digests(noisy / "train")  # train as before, byte for byte
    for split in ("val", "test"):
        counts = {c: len(list((noisy / split / c).glob("*.png"))) for c in ("x", "y", "z")}
        assert sum(counts.values()) == 30 and set(counts.values()) != {10}  # 3 of 30 under a wrong folder
        # the images are the clean dataset's, only filed under other folders
        assert sorted(file_digests(noisy / split).values()) == sorted(file_digests(clean / split).values())
    with pytest.raises(ValueError, match="held_out_noise"):
        make_synthetic_dataset(tmp_path / "bad", held_out_noise=1.0)


def test_synthetic_classes_differ_visibly(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", per_class=(4, 4, 8))

    def mean_colour(path):
        return np.asarray(PILImage.open(path).convert("RGB"), dtype=float).reshape(-1, 3).mean(0)

    centres = np.stack([np.mean([mean_colour(p) for p in (root / "val" / c).glob("*.png")], 0) for c in MIKELS8])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert distances[~np.eye(len(MIKELS8), dtype=bool)].min() > 40
    correct = [np.argmin(np.linalg.norm(centres - mean_colour(p), axis=1)) == k
               for k, c in enumerate(MIKELS8) for p in (root / "test" / c).glob("*.png")]  # fmt: skip
    assert np.mean(correct) > 0.95


def test_synthetic_dataset_is_reused_or_rewritten(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", labels=("x", "y", "z"), per_class=(4, 1, 1))
    marker = root / "train" / "x" / "x_0.png"
    stamp = marker.stat().st_mtime_ns
    os.utime(marker, ns=(stamp - 10**9, stamp - 10**9))
    make_synthetic_dataset(root, labels=("x", "y", "z"), per_class=(4, 1, 1))
    assert marker.stat().st_mtime_ns == stamp - 10**9  # same arguments: not rewritten
    assert json.loads((root / "synthetic.json").read_text())["args"]["labels"] == ["x", "y", "z"]
    make_synthetic_dataset(root, labels=("p", "q"), per_class=(4, 0, 1), label_noise=0)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["p", "q"] and not (root / "val").exists()
    result = load_image_dataset(root, val_fraction=0)
    assert names_of(result["train"]) == ["p", "q"] and result["train"].num_rows == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        make_synthetic_dataset(tmp_path / "other")


def test_splits_argument_reads_only_the_requested_split(tmp_path, caplog):
    """Evaluation asks for one split: an unreadable train file is then never opened, nor reported."""
    root = make_synthetic_dataset(tmp_path / "syn", per_class=(3, 1, 2))
    bad = next((root / "train").rglob("*.png"))
    bad.write_bytes(b"")
    with caplog.at_level("WARNING"):
        test_only = load_image_dataset(root, splits=["test"])
    assert list(test_only) == ["test"] and len(test_only["test"]) == 16
    assert "unreadable" not in caplog.text
    full = load_image_dataset(root)
    assert full["test"]["id"] == test_only["test"]["id"]
    assert "unreadable" in caplog.text
    with pytest.raises(ValueError, match="no split"):
        load_image_dataset(root, splits=["holdout"])
