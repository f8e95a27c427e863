"""Tiny copies of the paper's five datasets in the form their authors distribute them: same file names, nesting,
columns and encodings, a few 32x32 images per class. Each class has its own colour (hue), so that tiny models learn
them. Every writer is seeded (same arguments, same files) and returns the dataset root.

    from dataset_fixtures import write_emoset, write_emotion6, write_fi, write_flickr, write_instagram
    from dataset_fixtures import write_fi_unpacked, write_sentiment_split   # as downloads unpack / authors split

    root = write_fi(tmp_path / "FI", per_class=6)        # then load_image_dataset(root), format "fi"

The sources each layout was checked against are named above each writer (and in `emovlm_kd.data`'s readers).
"""

import colorsys
import csv
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from emovlm_kd.labels import EKMAN6, MIKELS8

EMOSET_ORDER = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")
VOTES_HEADER = ("ImageID", "Num_of_Positive", "Num_of_Neutral", "Num_of_Negative")
POSITIVE_VOTES = ((3, 0, 0), (2, 1, 0), (2, 0, 1))  # (positive, neutral, negative) of three workers
NEGATIVE_VOTES = ((0, 0, 3), (0, 1, 2), (1, 0, 2))
DROPPED_VOTES = ((0, 3, 0), (1, 1, 1), (1, 2, 0), (0, 2, 1))  # no majority for either polarity
FIRST_ID = {"flickr": 10002040436, "instagram": 1000350219}  # numeric ids (Instagram's id form: unverified)


def class_image(index, num_classes, rng, size=32):
    """A `size` x `size` RGB image in class `index`'s own hue, with brightness and pixel noise jitter."""
    colour = np.array(colorsys.hsv_to_rgb(index / num_classes, 0.85, 0.95)) * 255 * rng.uniform(0.85, 1.0)
    pixels = colour + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95)
    return path


def _counts(per_class, names):
    """`{name: count}` from an int (the same for every class) or a mapping."""
    return {name: int(per_class[name] if isinstance(per_class, dict) else per_class) for name in names}


# FI (You et al., AAAI 2016), as downloaded: one folder per Mikels emotion, JPEG files `<emotion>_<number>.jpg`
# (a public FI loader takes the label as `filename.split('_')[0]`), no split.
def write_fi(root, per_class=6, size=32, seed=0):
    """`<root>/<emotion>/<emotion>_<nnnn>.jpg` for the eight Mikels emotions; `per_class` an int or a mapping."""
    root, rng = Path(root), np.random.default_rng(seed)
    for k, (emotion, count) in enumerate(_counts(per_class, MIKELS8).items()):
        for i in range(1, count + 1):
            save_jpeg(class_image(k, len(MIKELS8), rng, size), root / emotion / f"{emotion}_{i:04d}.jpg")
    return root


# FI as its archive unpacks: `emotion_dataset.tar` holds one top folder `emotion_dataset/` with the eight
# lower-case Mikels class folders of .jpg files and nothing else (23,185 JPEGs, no metadata file: the tar listing in
# github dsikar/vidiq-hpc, reports/18-fi-archive-analytics-report.md). The user points at the folder the tar was
# unpacked into, which holds `emotion_dataset/` and often the .tar itself.
def write_fi_unpacked(root, per_class=4, keep_tar=True, size=32, seed=0):
    """`<root>/emotion_dataset/<emotion>/*.jpg`, unpacked with `tarfile` from a real `emotion_dataset.tar` made of
    `write_fi`'s files (left beside it when `keep_tar`). Returns `root`, the folder the tar was unpacked into."""
    root = Path(root)
    staging = write_fi(root.parent / f".{root.name}-staging" / "emotion_dataset", per_class, size, seed)
    archive = root / "emotion_dataset.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        tar.add(staging, arcname="emotion_dataset")
    with tarfile.open(archive) as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if not keep_tar:
        archive.unlink()
    return root


# EmoSet-118K (github JingyuanYY/EmoSet: README.md, EmoSet.py, info.json): info.json nests per attribute
# `info["emotion"]["label2idx"]` / `["idx2label"]` (emotion order amusement 0 ... sadness 7); {train,val,test}.json are
# JSON lists of `[emotion, image_id, image_path, annotation_path]` (copies in circulation drop the image id);
# images under `image/<emotion>/`, per-image attribute JSON under `annotation/<emotion>/` (brightness and
# colorfulness as numbers; the scene/object/facial-expression/action attributes and info.json entries are left out).
# The download (Dropbox/Baidu) differs from the GitHub copy: its info.json is flat, `{"label2idx": {"amusement": 0,
# ...}, "idx2label": {"0": "amusement", ...}}` for the emotions alone (github JingyuanYY/EmoSet issue #2, "On
# info.json", quoting the downloaded file), and its split rows have three fields (issue #4): `flat_info=True`,
# `row_items=3`.
def write_emoset(root, per_class=(4, 1, 2), row_items=4, emotions=EMOSET_ORDER, size=32, seed=0, flat_info=False):
    """EmoSet-118K with `per_class` (train, val, test) images of each of `emotions`; rows of 3 or 4 items;
    `flat_info`: the download's flat info.json."""
    if row_items not in (3, 4):
        raise ValueError(f"row_items must be 3 or 4, got {row_items}")
    root, rng = Path(root), np.random.default_rng(seed)
    levels = [round(0.1 * i, 1) for i in range(11)]
    info = {"emotion": {"label2idx": {name: i for i, name in enumerate(EMOSET_ORDER)},
                        "idx2label": {str(i): name for i, name in enumerate(EMOSET_ORDER)}}}  # fmt: skip
    for attribute in ("brightness", "colorfulness"):
        info[attribute] = {"label2idx": {str(v): i for i, v in enumerate(levels)},
                           "idx2label": {str(i): v for i, v in enumerate(levels)}}  # fmt: skip
    if flat_info:
        info = info["emotion"]
    _write_json(root / "info.json", info)
    number = dict.fromkeys(emotions, 0)
    for split, count in zip(("train", "val", "test"), per_class):
        rows = []
        for emotion in emotions:
            for _ in range(count):
                number[emotion] += 1
                image_id = f"{emotion}_{number[emotion]}"
                image, annotation = f"image/{emotion}/{image_id}.jpg", f"annotation/{emotion}/{image_id}.json"
                save_jpeg(class_image(EMOSET_ORDER.index(emotion), len(EMOSET_ORDER), rng, size), root / image)
                levels_of = {"brightness": float(rng.choice(levels)), "colorfulness": float(rng.choice(levels))}
                _write_json(root / annotation, levels_of)
                rows.append([emotion, image_id, image, annotation] if row_items == 4 else [emotion, image, annotation])
        _write_json(root / f"{split}.json", rows)
    return root


# Emotion6 (Peng et al., CVPR 2015; the archive's readme.txt): `images/<emotion>/<n>.jpg` (330 per emotion in the
# real set), `ground_truth.txt` = a first line, then tab-separated `[image_filename] [valence] [arousal] [prob. anger]
# [prob. disgust] [prob. fear] [prob. joy] [prob. sadness] [prob. surprise] [prob. neutral]`, file names relative to
# images/, probabilities as shares of the raters printed like "0.133333  0.7  0  0.0666667" (the readme's example
# line is "disgust/1.jpg 2.5 3.8 0.133333 0.7 0 0.0666667 0.1 0 0"; row order here is by emotion).
def write_emotion6(root, per_class=6, size=32, seed=0, probabilities=None):
    """Emotion6 with `per_class` images per emotion; `probabilities` {"anger/1.jpg": 7 numbers} overrides rows."""
    root, rng = Path(root), np.random.default_rng(seed)
    probabilities = probabilities or {}
    header = ["[image_filename]", "[valence]", "[arousal]"] + [f"[prob. {e}]" for e in (*EKMAN6, "neutral")]
    lines = ["\t".join(header)]
    for k, (emotion, count) in enumerate(_counts(per_class, EKMAN6).items()):
        for i in range(1, count + 1):
            name = f"{emotion}/{i}.jpg"
            save_jpeg(class_image(k, len(EKMAN6), rng, size), root / "images" / name)
            shares = [0.0] * 7
            shares[k], shares[(k + 1) % 6], shares[6] = 9 / 15, 3 / 15, 3 / 15
            row = probabilities.get(name, shares)
            valence, arousal = rng.uniform(1, 9), rng.uniform(1, 9)
            lines.append("\t".join([name, f"{valence:.1f}", f"{arousal:.1f}", *(f"{p:.6g}" for p in row)]))
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n", encoding="ascii")
    return root


# Flickr / Instagram of Katsurai & Satoh (ICASSP 2016; mm.doshisha.ac.jp image-sentiment page; the file names and
# columns as public loaders read them: `flickr{1,2,3}_icassp2016_dataset.csv` with the header
# `ImageID,Num_of_Positive,Num_of_Neutral,Num_of_Negative`, one row per image of three workers' votes). The images
# are not distributed; users fetch them by id, and crawlers name them differently (`image_name`, a format string of
# `{id}` and `{label}`): `images/{id}.jpg` (the default); `images2/{id}` with NO extension (A. Ortis's Flickr crawler
# for these vote files, Univ. Catania 2016: `img_path = "images2/"+photo_id#+".jpg"`, then `urlretrieve`); or
# `{label}/{id}.jpg` (a public ImageSentimentAnalysis script moves each `<id>.jpg` into `training_set/<sentiment>/`).
def write_flickr(root, per_label=6, dropped=3, missing=0, size=32, seed=0, image_name="images/{id}.jpg"):
    """The Flickr vote files (three batches) and images: `per_label` ids with a positive (negative) majority,
    `dropped` ids without one, and `missing` of the labelled ids without an image file."""
    return write_votes("flickr", root, per_label, dropped, missing, size, seed, image_name)


def write_instagram(root, per_label=6, dropped=3, missing=0, size=32, seed=0, image_name="images/{id}.jpg"):
    """The Instagram vote files (`instagram{1,2,3}_icassp2016_dataset.csv`, named by analogy) and images."""
    return write_votes("instagram", root, per_label, dropped, missing, size, seed, image_name)


def write_votes(site, root, per_label, dropped, missing, size=32, seed=0, image_name="images/{id}.jpg"):
    """`<root>/<site>{1,2,3}_icassp2016_dataset.csv` and the images at `<root>/<image_name>` (see `write_flickr`;
    `{label}` of an id without a majority is `neutral`)."""
    root, rng = Path(root), np.random.default_rng(seed)
    rows = [(POSITIVE_VOTES[i % 3], 0) for i in range(per_label)]  # (votes, colour slot)
    rows += [(NEGATIVE_VOTES[i % 3], 1) for i in range(per_label)]
    rows += [(DROPPED_VOTES[i % 4], 2) for i in range(dropped)]
    ids = [str(FIRST_ID[site] + 7 * n) for n in range(len(rows))]
    labelled = [i for pair in zip(ids[:per_label], ids[per_label : 2 * per_label]) for i in pair]  # +, -, +, ...
    absent = set(labelled[:missing])
    for image_id, (_, colour) in zip(ids, rows):
        if image_id not in absent:
            name = image_name.format(id=image_id, label=("positive", "negative", "neutral")[colour])
            save_jpeg(class_image(colour * 3, 8, rng, size), root / name)
    for batch in range(3):
        with open(root / f"{site}{batch + 1}_icassp2016_dataset.csv", "w", encoding="ascii", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(VOTES_HEADER)
            writer.writerows([image_id, *votes] for image_id, (votes, _) in list(zip(ids, rows))[batch::3])
    return root


# The EmoVLM-KD authors' own pre-split Flickr and Instagram (github sange1104/OSANet: data/README.md draws
# `data/{FI,flickr,instagram}/{train,val,test}`; dataloader.py lists `<split>/<emotion>/` and takes the label from the
# folder, the number from the file name: Flickr and FI `<label>_<n>.jpg` (`split('_')[-1]`), Instagram
# `<label>_<n>_<m>.jpg` (`split('_')[-2]`)); the sentiment sets' folders are `positive/` and `negative/`.
def write_sentiment_split(root, site="flickr", per_split=(4, 1, 2), size=32, seed=0):
    """`<root>/{train,val,test}/{positive,negative}/<label>_<n>[_<m>].jpg`, `per_split` images of each label."""
    root, rng = Path(root), np.random.default_rng(seed)
    number = 0
    for split, count in zip(("train", "val", "test"), per_split):
        for k, label in enumerate(("positive", "negative")):
            for _ in range(count):
                number += 1
                name = f"{label}_{number}.jpg" if site == "flickr" else f"{label}_{number}_{number % 7}.jpg"
                save_jpeg(class_image(k * 3, 8, rng, size), root / split / label / name)
    return root


def _write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=4) + "\n", encoding="utf-8")


def write_image(path, colour=(200, 40, 40), size=(12, 10), format=None):
    """A small solid-colour image file at `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=format)
    return path


def make_split_folders(root, counts):
    """`root/<split>/<class>/<i>.png`; `counts`: {split: {class_folder: number of images}}."""
    for split, classes in counts.items():
        for name, count in classes.items():
            for i in range(count):
                write_image(Path(root) / split / name / f"{i}.png", colour=(10 * i, 50, 90))
    return Path(root)
