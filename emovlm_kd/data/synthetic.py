"""`make_synthetic_dataset`: a tiny, learnable, seeded image dataset in the official layout, for the demo and tests.

Each class has its own dominant hue and stripe orientation/period, so a small head learns it from pooled features.
Beside the images, `reasoning.jsonl` holds a reasoning answer per train image (what it shows, the emotion it is
labelled with) in the format of `--instructions`: the offline stand-in for the paper's GPT-4 annotations.
"""

import colorsys
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from emovlm_kd.data.records import SPLITS
from emovlm_kd.folders import atomic_write_text, is_partial_write
from emovlm_kd.labels import MIKELS8

logger = logging.getLogger(__name__)

SYNTHETIC_FORMAT = 2  # 2: with reasoning.jsonl
REASONING_FILE = "reasoning.jsonl"
# Names of hues (degrees) and stripe directions (degrees of the direction the shade varies along) for the answers.
HUE_NAMES = ((0, "red"), (45, "orange"), (90, "yellow-green"), (135, "green"), (180, "cyan"), (225, "blue"),
             (270, "violet"), (315, "pink"), (360, "red"))
STRIPE_NAMES = ((0, "vertical"), (45, "diagonal"), (90, "horizontal"), (135, "diagonal"), (180, "vertical"))
STRIPE_WIDTHS = ("narrow", "medium", "wide")


def make_synthetic_dataset(root, labels=MIKELS8, per_class=(24, 6, 8), image_size=48, label_noise=0.05, seed=0,
                           held_out_noise=0.0):
    """Write a small, learnable dataset in the official layout `<root>/{train,val,test}/<class>/<class>_<i>.png`.

    Each class has its own dominant hue and stripe orientation/period; images vary in size (about 5/6 to 4/3 of
    `image_size`, some non-square), brightness, stripe position and noise. A `label_noise` fraction of train
    images is written under a wrong class folder, and a `held_out_noise` fraction of val and of test images (real
    datasets' held-out labels are noisy too: without a single wrong label there, a held-out split cannot
    calibrate a classifier that gets every clean image right). Same arguments, same bytes; a folder already holding a complete
    dataset written with the same arguments (see `synthetic.json`) is returned as is.
    """
    root = Path(root)
    args = _synthetic_args(labels, per_class, image_size, label_noise, seed, held_out_noise)
    if _synthetic_is_complete(root, args):
        return root
    _clear_synthetic(root)
    rng = np.random.default_rng(seed)
    written = Counter()  # files per folder: the next file's index
    reasoning = []
    for split, folders, classes in _synthetic_plan(args, rng):
        for folder_index, class_index in zip(folders, classes):
            folder = root / split / args["labels"][folder_index]
            folder.mkdir(parents=True, exist_ok=True)
            image = _synthetic_image(rng, class_index, len(args["labels"]), image_size)
            name = f"{folder.name}_{written[folder]}.png"
            image.save(folder / name, format="PNG")
            written[folder] += 1
            if split == "train":
                answer = reasoning_answer(class_index, len(args["labels"]), folder.name, image_size)
                reasoning.append({"id": f"{split}/{folder.name}/{name}", "kind": "reasoning", "answer": answer})
    count = sum(written.values())
    _write_atomically(root / REASONING_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in reasoning))
    payload = {"format": SYNTHETIC_FORMAT, "args": args, "files": count}
    _write_atomically(root / "synthetic.json", json.dumps(payload, indent=2) + "\n")  # last: the dataset is complete
    logger.info("Wrote %d synthetic images to %s", count, root)
    return root


def _synthetic_args(labels, per_class, image_size, label_noise, seed, held_out_noise=0.0):
    """The arguments of `make_synthetic_dataset`, checked, as a JSON-ready dict."""
    labels = [str(label) for label in labels]
    per_class = [int(count) for count in per_class]
    if not labels or len(set(labels)) != len(labels) or any(not label or "/" in label for label in labels):
        raise ValueError(f"labels must be unique, non-empty folder names, got {labels}")
    if len(per_class) != 3 or min(per_class) < 0 or per_class[0] < 1:
        raise ValueError(f"per_class must be (train >= 1, val >= 0, test >= 0) counts, got {per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 0 <= label_noise < 1 or not 0 <= held_out_noise < 1:
        raise ValueError(f"label_noise and held_out_noise must be in [0, 1), got {label_noise}, {held_out_noise}")
    args = {"labels": labels, "per_class": per_class, "image_size": int(image_size),
            "label_noise": float(label_noise), "seed": int(seed)}  # fmt: skip
    if held_out_noise:  # absent when 0: a dataset written before the setting existed is the same dataset
        args["held_out_noise"] = float(held_out_noise)
    return args


def _synthetic_is_complete(root, args):
    """Whether `root` holds a complete synthetic dataset written with `args`."""
    try:
        written = json.loads((root / "synthetic.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if written.get("format") != SYNTHETIC_FORMAT or written.get("args") != args:
        return False
    if not (root / REASONING_FILE).is_file():
        return False
    return sum(1 for split in SPLITS for _ in (root / split).glob("*/*.png")) == written.get("files")


def _clear_synthetic(root):
    """Remove an earlier (stale or partial) synthetic dataset; refuse to touch a folder holding anything else."""
    ours = {*SPLITS, "synthetic.json", "synthetic.json.tmp", REASONING_FILE, REASONING_FILE + ".tmp"}
    if root.is_dir():
        others = sorted(name for name in set(os.listdir(root)) - ours if not is_partial_write(name))
        if others:
            raise ValueError(f"{root} holds files that are not a synthetic dataset ({others[:5]}): use an empty folder")
        (root / "synthetic.json").unlink(missing_ok=True)
        (root / REASONING_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def _synthetic_plan(args, rng):
    """`[(split, folder_class_indices, true_class_indices)]`: train has `label_noise` of its folders wrong, val and
    test `held_out_noise`."""
    num_classes = len(args["labels"])
    plan = []
    for split, count in zip(SPLITS, args["per_class"]):
        classes = np.repeat(np.arange(num_classes), count)
        folders = classes.copy()
        noise = args["label_noise"] if split == "train" else args.get("held_out_noise", 0.0)
        # held-out noise from its own generator: the images (drawn from `rng` next) are those of a clean dataset
        draw = rng if split == "train" else np.random.default_rng([args["seed"], SPLITS.index(split)])
        if num_classes > 1 and (split == "train" or noise):
            noisy = draw.choice(len(classes), size=round(noise * len(classes)), replace=False)
            folders[noisy] = (classes[noisy] + draw.integers(1, num_classes, size=len(noisy))) % num_classes
        plan.append((split, folders.tolist(), classes.tolist()))
    return plan


def _nearest_name(degrees, names):
    return min(names, key=lambda entry: abs(entry[0] - degrees))[1]


def reasoning_answer(class_index, num_classes, label, image_size):
    """A reasoning answer for an image of class `class_index` labelled `label`: its hue and stripes (as
    `_synthetic_image` draws them for that class), then the emotion, in the paper's two steps (what the image shows,
    what it evokes)."""
    hue = _nearest_name(360 * class_index / num_classes, HUE_NAMES)
    stripes = _nearest_name(180 * class_index / num_classes, STRIPE_NAMES)
    width = STRIPE_WIDTHS[class_index % 3]
    return f"The image is {hue} with {width} {stripes} stripes, so it evokes {label}."


def _synthetic_image(rng, class_index, num_classes, image_size):
    """One RGB image of class `class_index`: the class hue, shaded by stripes of the class angle and period."""
    low, high = round(image_size * 5 / 6), round(image_size * 4 / 3)
    width = int(rng.integers(low, high + 1))
    height = width if rng.random() < 0.5 else int(rng.integers(low, high + 1))
    hue = (class_index / num_classes + rng.normal(0, 0.01)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 1.0)) * 255 * rng.uniform(0.75, 1.0)  # brightness jitter
    angle = np.pi * class_index / num_classes + rng.normal(0, 0.05)
    period = image_size / 8 * (1 + class_index % 3)
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi)  # stripe position jitter
    stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
    shade = 0.7 + 0.3 * stripes  # (H, W) in [0.4, 1]
    pixels = shade[..., None] * colour + rng.normal(0, 8, (height, width, 3))
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_atomically(path, text):
    """Write `text` to `path` via a temp file and `os.replace` (`emovlm_kd.folders.atomic_write_text`)."""
    atomic_write_text(path, text)
