"""Datasets as their users really have them (fixtures in `dataset_fixtures`, each naming the public source it
mirrors): FI unpacked from its tar, EmoSet-118K's downloaded info.json, Flickr images crawled without an extension,
the authors' pre-split Flickr/Instagram; and the one-line refusals of what cannot be a dataset (unlabelled images,
one class, no test split, rows outside the dataset, files that are not what they claim)."""

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from dataset_fixtures import (  # noqa: E402
    write_emoset,
    write_fi,
    write_fi_unpacked,
    write_flickr,
    write_image,
    write_instagram,
    write_sentiment_split,
)
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image  # noqa: E402

from emovlm_kd.cli import main  # noqa: E402
from emovlm_kd.data import load_image_dataset  # noqa: E402
from emovlm_kd.data.loading import dataset_format_of  # noqa: E402
from emovlm_kd.data.splitfile import read_splits  # noqa: E402
from emovlm_kd.labels import MIKELS8, SENTIMENT2  # noqa: E402


def ids(data):
    return {split: part["id"] for split, part in data.items()}


def split_cli(capsys, *argv):
    """`emovlm-kd split ...`: (exit status, stderr)."""
    try:
        status = main(["split", *map(str, argv)])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ FI from its tar


def test_fi_unpacked_from_its_tar_is_read_inside_its_wrapper_folder(tmp_path):
    root = write_fi_unpacked(tmp_path / "downloads", per_class=4)  # holds emotion_dataset/ and emotion_dataset.tar
    data = load_image_dataset(root)
    assert set(data) == {"train", "val", "test"}
    assert data["train"].features["label"].names == list(MIKELS8)
    assert ids(data) == ids(load_image_dataset(root / "emotion_dataset"))  # the same ids, the same split
    assert ids(load_image_dataset(root, dataset_format="fi")) == ids(data)
    assert dataset_format_of(str(root)) == "fi"  # evaluate's report compares it with the paper's FI


def test_split_cli_on_the_unpacked_tar_writes_train_val_test(tmp_path, capsys):
    root = write_fi_unpacked(tmp_path / "downloads", per_class=4)
    status, _ = split_cli(capsys, root, "--output", tmp_path / "fi.json")
    assert status == 0
    record = read_splits(tmp_path / "fi.json")
    assert all(record[split] for split in ("train", "val", "test"))
    assert record["test"][0].split("/")[0] in MIKELS8  # ids relative to emotion_dataset/, as when pointed at it


def test_a_folder_holding_several_datasets_names_them(tmp_path):
    write_fi(tmp_path / "data" / "FI", per_class=2)
    write_emoset(tmp_path / "data" / "EmoSet", per_class=(1, 1, 1))
    with pytest.raises(ValueError, match=r"sub-folders EmoSet/ \(emoset\), FI/ \(fi\): point at one of them"):
        load_image_dataset(tmp_path / "data")


# ---------------------------------------------------------------------------------------------- EmoSet-118K


def test_emoset_as_downloaded_flat_info_json_and_three_field_rows(tmp_path):
    root = write_emoset(tmp_path / "EmoSet-118K", per_class=(2, 1, 1), row_items=3, flat_info=True)
    assert set(json.loads((root / "info.json").read_text())) == {"label2idx", "idx2label"}
    data = load_image_dataset(root)
    assert {split: part.num_rows for split, part in data.items()} == {"train": 16, "val": 8, "test": 8}
    assert data["train"].features["label"].names == list(MIKELS8)


def test_emoset_info_json_that_is_not_json_is_named(tmp_path):
    root = write_emoset(tmp_path / "EmoSet-118K", per_class=(1, 1, 1))
    (root / "info.json").write_text("<html>quota exceeded</html>")
    with pytest.raises(ValueError, match=r"EmoSet-118K/info\.json: not valid JSON \(line 1 column 1"):
        load_image_dataset(root)


@pytest.mark.parametrize("image_path", ["../../outside/secret.png", "ABSOLUTE", "image/../../outside/secret.png"])
def test_emoset_rows_outside_the_dataset_folder_are_refused(tmp_path, image_path):
    root = write_emoset(tmp_path / "a" / "EmoSet-118K", per_class=(2, 1, 1), emotions=("awe", "fear"))
    secret = write_image(tmp_path / "outside" / "secret.png")  # it exists: read before, with a leakage warning only
    image_path = str(secret) if image_path == "ABSOLUTE" else image_path
    rows = json.loads((root / "train.json").read_text())
    rows[1] = ["awe", "awe_99", image_path, "annotation/awe/awe_1.json"]
    (root / "train.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"train\.json row 1: the image path .* points outside the dataset folder"):
        load_image_dataset(root)


# ---------------------------------------------------------------------------------------- Flickr, Instagram


@pytest.mark.parametrize("image_name", ["images2/{id}", "{label}/{id}", "crawl/batch1/{id}"])
def test_flickr_images_named_by_id_with_or_without_extension_in_any_folder(tmp_path, image_name):
    root = write_flickr(tmp_path / "Flickr", per_label=6, image_name=image_name)
    data = load_image_dataset(root)
    assert sum(part.num_rows for part in data.values()) == 12
    assert data["train"].features["label"].names == list(SENTIMENT2)


def test_a_crawled_page_saved_under_an_id_is_no_image(tmp_path, caplog):
    root = write_flickr(tmp_path / "Flickr", per_label=6, image_name="images2/{id}")
    first = sorted((root / "images2").iterdir())[0]
    first.write_text("<html>This photo is no longer available</html>")  # what a crawler saves for a deleted photo
    data = load_image_dataset(root)
    assert sum(part.num_rows for part in data.values()) == 11
    assert f"have no image file under {root}: dropped ({first.name})" in caplog.text


@pytest.mark.parametrize("site, writer", [("flickr", write_flickr), ("instagram", write_instagram)])
def test_the_authors_pre_split_layout_is_read_as_their_dataset_format(tmp_path, site, writer):
    root = write_sentiment_split(tmp_path / site, site=site, per_split=(4, 1, 2))
    data = load_image_dataset(root, dataset_format=site)
    assert {split: part.num_rows for split, part in data.items()} == {"train": 8, "val": 2, "test": 4}  # kept
    assert data["test"].features["label"].names == list(SENTIMENT2)
    assert ids(data) == ids(load_image_dataset(root))  # detection reads the same folders
    (root / "train" / "neutral").mkdir()
    write_image(root / "train" / "neutral" / "neutral_1.jpg")
    with pytest.raises(ValueError, match=rf"{site} class folders must be negative and positive, found \['neutral'\]"):
        load_image_dataset(root, dataset_format=site)


def test_split_cli_reads_the_authors_flickr_layout_with_dataset_format_flickr(tmp_path, capsys):
    root = write_sentiment_split(tmp_path / "flickr", per_split=(4, 1, 2))
    status, err = split_cli(capsys, root, "--dataset-format", "flickr", "--output", tmp_path / "s.json")
    assert status == 0, err
    record = read_splits(tmp_path / "s.json")
    assert len(record["test"]) == 4 and record["dataset"]["dataset_format"] == "flickr"


# ------------------------------------------------------------------------------------------------- labels


def test_unlabelled_images_are_refused_before_any_image_is_opened(tmp_path, capsys, monkeypatch):
    for i in range(5):
        write_image(tmp_path / "holiday" / f"IMG_{i:04d}.jpg")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_decoding)
    with pytest.raises(ValueError, match=r"holiday: 5 image file\(s\) but no labels .* class folders .*--label-column"):
        load_image_dataset(tmp_path / "holiday")
    status, err = split_cli(capsys, tmp_path / "holiday", "--output", tmp_path / "s.json")
    assert status == 2 and "but no labels" in err and "manifest" in err
    assert not (tmp_path / "s.json").exists()


def _emotions_on_disk(path, label_name="sentiment"):
    """A `save_to_disk` dataset whose label column has another name than label/labels/emotion (strings)."""
    features = Features({"img": ImageFeature(), label_name: Value("string")})
    split = {"img": [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(6)], label_name: ["joy", "fear"] * 3}
    DatasetDict({"train": Dataset.from_dict(split, features=features),
                 "test": Dataset.from_dict(split, features=features)}).save_to_disk(path)  # fmt: skip
    return path


def test_label_column_flag_names_the_label_column(tmp_path, capsys):
    root = _emotions_on_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"no label column among \['img', 'sentiment'\].*--label-column NAME"):
        load_image_dataset(root)
    status, err = split_cli(capsys, root, "--label-column", "sentiment", "--output", tmp_path / "s.json")
    assert status == 0, err
    assert read_splits(tmp_path / "s.json")["dataset"]["label_column"] == "sentiment"
    status, err = split_cli(capsys, root, "--label-column", "mood", "--output", tmp_path / "t.json")
    assert status == 2 and "label column 'mood' (--label-column) is not a column" in err


def test_label_column_is_a_flag_of_train_and_evaluate(tmp_path):
    from emovlm_kd.cli import build_parser
    from emovlm_kd.settings import dataset_options
    from emovlm_kd.training.config import parse_train_args

    assert parse_train_args(["--label-column", "sentiment"]).label_column == "sentiment"
    args, _ = build_parser().parse_known_args(
        ["evaluate", "--model", "m", "--dataset", "d", "--output-dir", "o", "--label-column", "sentiment"])
    assert dataset_options(args)["label_column"] == "sentiment"


def test_label_column_is_refused_for_a_layout_whose_files_carry_the_labels(tmp_path):
    root = write_fi(tmp_path / "FI", per_class=2)
    with pytest.raises(ValueError, match=r"is read as fi"):
        load_image_dataset(root, label_column="label")


# ---------------------------------------------------------------------------------------- refused at split


def test_one_class_is_refused_at_split(tmp_path, capsys):
    for i in range(6):
        write_image(tmp_path / "mine" / "happy" / f"{i}.png", colour=(10 * i, 0, 0))
    status, err = split_cli(capsys, tmp_path / "mine", "--output", tmp_path / "s.json")
    assert status == 2 and "only the class 'happy': a classifier needs images of at least two classes" in err
    assert not (tmp_path / "s.json").exists()
    one = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 4, "label": ["sad"] * 4})
    one.cast_column("label", ClassLabel(names=["sad"])).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="only the class 'sad'"):
        load_image_dataset(tmp_path / "saved")


def test_a_folder_without_a_test_split_is_refused_by_split(tmp_path, capsys):
    for split in ("train", "val"):
        for name in ("calm", "tense"):
            for i in range(3):
                write_image(tmp_path / "mine" / split / name / f"{i}.png", colour=(10 * i, 0, 0))
    status, err = split_cli(capsys, tmp_path / "mine", "--output", tmp_path / "s.json")
    assert status == 2 and "yields no test split (it has train, val): a split file needs train and test" in err
    assert not (tmp_path / "s.json").exists()


# ------------------------------------------------------------------------------- files that are not right


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": ["a"], "test": "string"}, "'test' must be a list of ids, got a str"),
        ({"train": ["a"], "test": [["b"]]}, r"'test' must hold ids as strings, got \['b'\]"),
        (["a", "b"], "expected a JSON object of id lists"),
    ],
)
def test_a_split_file_of_the_wrong_shape_is_named(tmp_path, content, message):
    (tmp_path / "s.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"--splits {tmp_path / 's.json'}: {message}"):
        read_splits(tmp_path / "s.json")


def test_a_garbage_manifest_line_is_named_with_its_file_and_line(tmp_path):
    for name in ("a", "b"):
        for i in range(4):
            write_image(tmp_path / name / f"{i}.png")
    rows = [{"path": f"{name}/{i}.png", "label": name} for name in ("a", "b") for i in range(4)]
    lines = [json.dumps(row) for row in rows]
    lines[5] = "garbage"
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl line 6: not JSON"):
        load_image_dataset(tmp_path / "m.jsonl")
    with open(tmp_path / "m.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerows([("path", "label"), *((row["path"], row["label"]) for row in rows[:4])])
        writer.writerow(("b/0.png", "b", "stray field"))
    with pytest.raises(ValueError, match=r"m\.csv line 6: 3 field\(s\) where the header \['path', 'label'\] has 2"):
        load_image_dataset(tmp_path / "m.csv")
