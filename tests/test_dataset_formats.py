"""The paper's five datasets as their authors distribute them (fixtures in `dataset_fixtures`): each detected
automatically and by its explicit `dataset_format`, with its labels, counts and seeded stratified splits."""

import logging
import os
import shutil
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from dataset_fixtures import (  # noqa: E402
    EMOSET_ORDER,
    class_image,
    save_jpeg,
    write_emoset,
    write_emotion6,
    write_fi,
    write_flickr,
    write_instagram,
)
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from emovlm_kd.data import DATASET_FORMATS, load_image_dataset  # noqa: E402
from emovlm_kd.data.emoset import emoset_emotions  # noqa: E402
from emovlm_kd.data.readers import find_reader  # noqa: E402
from emovlm_kd.data.splitfile import labelled_ids  # noqa: E402
from emovlm_kd.labels import EKMAN6, MIKELS8, SENTIMENT2  # noqa: E402


def sizes(data):
    return {split: part.num_rows for split, part in data.items()}


def class_counts(part):
    names = part.features["label"].names
    return Counter(names[label] for label in part["label"])


def same_split(one, two):
    return {split: part["id"] for split, part in one.items()} == {split: part["id"] for split, part in two.items()}


def test_the_formats_are_the_documented_ones():
    assert set(DATASET_FORMATS) == {"fi", "emoset", "emotion6", "flickr", "instagram", "imagefolder", "manifest", "hub"}


# ------------------------------------------------------------------------------------------------------------ FI


def test_fi_is_detected_and_split_80_5_15_stratified(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=20)
    data = load_image_dataset(root)
    assert same_split(data, load_image_dataset(root, dataset_format="fi"))
    assert sizes(data) == {"train": 128, "val": 8, "test": 24}  # 80 / 5 / 15 of 160
    assert data["train"].features["label"].names == list(MIKELS8)
    for split, per_class in {"train": 16, "val": 1, "test": 3}.items():
        assert class_counts(data[split]) == dict.fromkeys(MIKELS8, per_class)
    ids = [row_id for part in data.values() for row_id in part["id"]]
    assert len(ids) == len(set(ids)) == 160 and "amusement/amusement_0001.jpg" in ids
    assert all(label == row_id.split("/")[0] for row_id, label in labelled_ids(data).items())


def test_fi_split_is_seeded_and_its_ratios_configurable(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=10)
    first = load_image_dataset(root, seed=7)
    assert same_split(first, load_image_dataset(root, seed=7))
    assert first["test"]["id"] != load_image_dataset(root, seed=8)["test"]["id"]
    other = load_image_dataset(root, split_ratios=(0.6, 0.2, 0.2))
    assert sizes(other) == {"train": 48, "val": 16, "test": 16}
    assert class_counts(other["val"]) == dict.fromkeys(MIKELS8, 2)
    assert list(load_image_dataset(root, split_ratios=(0.85, 0.0, 0.15))) == ["train", "test"]
    for bad in [(0.8, 0.1), (0.5, 0.1, 0.1), (0.0, 0.5, 0.5), (1.1, -0.05, -0.05)]:
        with pytest.raises(ValueError, match="split_ratios"):
            load_image_dataset(root, split_ratios=bad)


def test_fi_already_split_in_the_official_layout_keeps_its_split(tmp_path):
    root = tmp_path / "FI-split"
    for split, count in {"train": 3, "val": 1, "test": 2}.items():
        write_fi(root / split, per_class=count, seed=len(split))
    data = load_image_dataset(root)
    assert sizes(data) == {"train": 24, "val": 8, "test": 16}
    assert data["test"]["id"][0].startswith("test/amusement/")
    for dataset_format in ("imagefolder", "fi"):
        assert same_split(data, load_image_dataset(root, dataset_format=dataset_format))


def test_plain_class_folders_are_an_imagefolder_split_80_10_10(tmp_path):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("calm", "tense")):
        for i in range(10):
            save_jpeg(class_image(k, 2, rng), tmp_path / "pets" / name / f"{i}.jpg")
    data = load_image_dataset(tmp_path / "pets")
    assert sizes(data) == {"train": 16, "val": 2, "test": 2}
    assert same_split(data, load_image_dataset(tmp_path / "pets", dataset_format="imagefolder"))
    with pytest.raises(ValueError, match=r"Mikels emotions .*\['calm', 'tense'\]"):
        load_image_dataset(tmp_path / "pets", dataset_format="fi")
    save_jpeg(class_image(0, 2, rng), tmp_path / "hub-style" / "train" / "0.jpg")  # images, no class folders
    assert find_reader(tmp_path / "hub-style") is None  # left to `datasets` (the Hub's imagefolder)


def test_fixture_classes_differ_visibly(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=4)

    def mean_colour(path):
        return np.asarray(PILImage.open(path).convert("RGB"), dtype=float).reshape(-1, 3).mean(0)

    centres = np.stack([np.mean([mean_colour(p) for p in (root / e).glob("*.jpg")], 0) for e in MIKELS8])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert distances[~np.eye(len(MIKELS8), dtype=bool)].min() > 40


def test_fi_evaluation_reads_only_its_test_split(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=10)
    assert load_image_dataset(root, splits=["test"])["test"]["id"] == load_image_dataset(root)["test"]["id"]


# -------------------------------------------------------------------------------------------------------- EmoSet


@pytest.mark.parametrize("row_items", [3, 4])
def test_emoset_rows_of_three_or_four_items(tmp_path, row_items):
    root = write_emoset(tmp_path / "EmoSet-118K", per_class=(3, 1, 2), row_items=row_items)
    data = load_image_dataset(root)
    assert same_split(data, load_image_dataset(root, dataset_format="emoset"))
    assert sizes(data) == {"train": 24, "val": 8, "test": 16}  # its own split, kept
    assert data["train"].features["label"].names == list(MIKELS8)
    assert data["val"]["id"][0] == "image/amusement/amusement_4.jpg"
    assert all(label == row_id.split("/")[1] for row_id, label in labelled_ids(data).items())
    assert load_image_dataset(root, split_ratios=(0.5, 0.25, 0.25))["test"].num_rows == 16  # not re-split


def test_emoset_label_set_comes_from_the_real_info_json_nesting(tmp_path):
    root = write_emoset(tmp_path / "EmoSet-118K", per_class=(2, 1, 1), emotions=("fear", "awe"))
    assert emoset_emotions(root / "info.json") == list(EMOSET_ORDER)  # info["emotion"]["label2idx"], index order
    data = load_image_dataset(root)
    assert data["train"].features["label"].names == list(MIKELS8)  # all eight declared, two present
    (root / "info.json").write_text('{"label2idx": {"emotion": {"fear": 0, "awe": 1}}}')  # not EmoSet's nesting
    with pytest.raises(ValueError, match=r'info\["emotion"\]\["label2idx"\]'):
        load_image_dataset(root)


# ------------------------------------------------------------------------------------------------------ Emotion6

NEUTRAL_HIGHEST = [0.1, 0, 0, 0.3, 0, 0, 0.6]  # anger, disgust, fear, joy, sadness, surprise, neutral
TIE = [0.4, 0, 0.4, 0, 0, 0, 0.2]
ALL_NEUTRAL = [0, 0, 0, 0, 0, 0, 1]


def test_emotion6_labels_are_the_folders_by_default(tmp_path):
    root = write_emotion6(tmp_path / "Emotion6", per_class=6, probabilities={"anger/1.jpg": NEUTRAL_HIGHEST})
    data = load_image_dataset(root)
    assert same_split(data, load_image_dataset(root, dataset_format="emotion6", emotion6_labels="folder"))
    assert sizes(data) == {"train": 24, "val": 6, "test": 6}  # 80 / 10 / 10
    assert data["train"].features["label"].names == list(EKMAN6)
    labels = labelled_ids(data)
    assert len(labels) == 36 and labels["images/anger/1.jpg"] == "anger"
    assert all(label == row_id.split("/")[1] for row_id, label in labels.items())


def test_emotion6_argmax_ignores_neutral_and_drops_ties(tmp_path, caplog):
    rows = {"anger/1.jpg": NEUTRAL_HIGHEST, "anger/2.jpg": TIE, "disgust/1.jpg": ALL_NEUTRAL}
    root = write_emotion6(tmp_path / "Emotion6", per_class=6, probabilities=rows)
    with caplog.at_level(logging.INFO, logger="emovlm_kd.data"):
        data = load_image_dataset(root, emotion6_labels="argmax")
    labels = labelled_ids(data)
    assert len(labels) == 34 and labels["images/anger/1.jpg"] == "joy"
    assert "images/anger/2.jpg" not in labels and "images/disgust/1.jpg" not in labels
    assert "2 row(s) of ground_truth.txt dropped" in caplog.text
    with pytest.raises(ValueError, match="emotion6_labels"):
        load_image_dataset(root, emotion6_labels="mean")


# ---------------------------------------------------------------------------------------------- Flickr, Instagram


def expected_votes(root):
    """{id: label} of a fixture's vote files under the majority rule (read independently of the reader)."""
    result = {}
    for file in sorted(root.glob("*_icassp2016_dataset.csv")):
        for line in file.read_text().splitlines()[1:]:
            image_id, positive, neutral, negative = (field.strip() for field in line.split(","))
            total = int(positive) + int(neutral) + int(negative)
            result[image_id] = (
                "positive" if 2 * int(positive) > total else "negative" if 2 * int(negative) > total else None
            )
    return result


@pytest.mark.parametrize(
    "site, writer, paper", [("flickr", write_flickr, "60,738"), ("instagram", write_instagram, "42,832")]
)
def test_sentiment_sets_are_detected_and_labelled_by_majority(tmp_path, caplog, site, writer, paper):
    root = writer(tmp_path / site, per_label=6, dropped=3)
    with caplog.at_level(logging.INFO, logger="emovlm_kd.data"):
        data = load_image_dataset(root)
    assert same_split(data, load_image_dataset(root, dataset_format=site))
    assert data["train"].features["label"].names == list(SENTIMENT2)
    assert sizes(data) == {"train": 8, "val": 2, "test": 2}  # 80 / 5 / 15 of 12 labelled ids
    expected = {f"images/{i}.jpg": label for i, label in expected_votes(root).items() if label is not None}
    assert labelled_ids(data) == expected
    assert f"the paper: {paper}" in caplog.text and "3 dropped as neutral or disputed" in caplog.text


@pytest.mark.parametrize(
    "vote_rule, kept",
    [
        ("majority", 18),
        ("unanimous", 6),
        ("plurality", 20),
        (lambda pos, neu, neg: "positive" if pos else "negative", 22),
    ],
)
def test_the_vote_rule_is_explicit_and_configurable(tmp_path, vote_rule, kept):
    root = write_flickr(tmp_path / "flickr", per_label=9, dropped=4)
    assert sum(sizes(load_image_dataset(root, vote_rule=vote_rule)).values()) == kept


def test_a_bad_vote_rule_is_refused(tmp_path):
    root = write_flickr(tmp_path / "flickr", per_label=3, dropped=1)
    with pytest.raises(ValueError, match="vote_rule must be one of"):
        load_image_dataset(root, vote_rule="loudest")
    with pytest.raises(ValueError, match="vote_rule gave 'neutral'"):
        load_image_dataset(root, vote_rule=lambda pos, neu, neg: "neutral")


def test_missing_images_are_counted_in_one_warning_and_dropped(tmp_path, caplog):
    root = write_flickr(tmp_path / "flickr", per_label=6, dropped=3, missing=3)
    with caplog.at_level(logging.WARNING, logger="emovlm_kd.data"):
        data = load_image_dataset(root)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 12 labelled ids have no image file" in warnings[0].getMessage()
    assert sum(sizes(data).values()) == 9
    on_disk = {f"images/{path.name}" for path in (root / "images").iterdir()}
    assert set(labelled_ids(data)) <= on_disk


def test_one_vote_file_and_spaces_after_commas(tmp_path):
    root = write_flickr(tmp_path / "flickr", per_label=6, dropped=3)
    whole = load_image_dataset(root)
    for file in root.glob("*.csv"):
        file.write_text(file.read_text().replace(",", ", "))
    assert same_split(whole, load_image_dataset(root))
    batch = load_image_dataset(root / "flickr1_icassp2016_dataset.csv", split_ratios=(0.5, 0.0, 0.5))
    assert set(labelled_ids(batch)) < set(labelled_ids(whole))
    shutil.copy(root / "flickr2_icassp2016_dataset.csv", root / "votes.csv")
    renamed = load_image_dataset(root / "votes.csv", dataset_format="flickr", split_ratios=(0.5, 0.0, 0.5))
    assert sum(sizes(renamed).values()) == 4


# ------------------------------------------------------------------------------------------------ format choice


def test_a_named_format_must_fit_the_source(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=2)
    with pytest.raises(ValueError, match="dataset_format must be one of"):
        load_image_dataset(root, dataset_format="coco")
    with pytest.raises(ValueError, match="is not in the emoset format"):
        load_image_dataset(root, dataset_format="emoset")
    with pytest.raises(ValueError, match="dataset root not found"):
        load_image_dataset("someone/some-set", dataset_format="fi")


def test_hub_format_reads_a_save_to_disk_folder(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=list(SENTIMENT2))})
    pictures = [class_image(k % 2, 2, np.random.default_rng(k)) for k in range(4)]
    train = Dataset.from_dict({"image": pictures, "label": [0, 1, 0, 1]}, features=features)
    test = Dataset.from_dict({"image": pictures[:2], "label": [0, 1]}, features=features)
    DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    data = load_image_dataset(tmp_path / "saved", dataset_format="hub", val_fraction=0)
    assert sizes(data) == {"train": 4, "test": 2}
