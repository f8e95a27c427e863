"""Emotion6 as its authors distribute it (Peng, Sadovnik, Gallagher, Chen, CVPR 2015, "A Mixed Bag of Emotions";
the archive's readme.txt checked, as mirrored on the Hugging Face Hub in wudq/Small-Scale_VSA_Datasets,
Emotion6.zip):

    <root>/images/<emotion>/<n>.jpg   1,980 Flickr images, 330 in each of anger, disgust, fear, joy, sadness,
                                      surprise: "the name of the sub-folder is the emotion keyword used to search"
    <root>/ground_truth.txt           a first (header) line, then one tab-separated line per image:
                                      [image_filename] [valence] [arousal] [prob. anger] [prob. disgust]
                                      [prob. fear] [prob. joy] [prob. sadness] [prob. surprise] [prob. neutral],
                                      e.g. "disgust/1.jpg  2.5  3.8  0.133333  0.7  0  0.0666667  0.1  0  0"

Labels (`emotion6_labels`):
- "folder" (default): the sub-folder, as the paper's 1,980 = 6 x 330 and the official code's class folders imply.
- "argmax": the emotion of highest probability in `ground_truth.txt`. Neutral is ignored (the argmax is over the
  six emotions even where neutral is higher: the label set has no neutral). A row whose highest probability is
  shared by two or more emotions (a tie, including a row with all six at 0) is dropped; the count is logged.

No official split: a stratified, seeded 80 / 10 / 10 train / val / test split by default (`split_ratios` to
change it). No Emotion6 protocol comes with the paper, and the VEA papers' 80/5/15 is FI's; at 1,980 images 5% val
would be 16 or 17 images per class, 10% keeps 33 per class to select a checkpoint on (and a 198-image test).
"""

import logging
from pathlib import Path

from emovlm_kd.data.folders import class_folders
from emovlm_kd.data.records import UNSPLIT, Listing, Record, normalise_label
from emovlm_kd.images import iter_image_files
from emovlm_kd.labels import EKMAN6

logger = logging.getLogger(__name__)

EMOTION6_LABELS = ("folder", "argmax")
EMOTION6_PAPER_IMAGES = 1_980
EMOTION6_RATIOS = (0.8, 0.1, 0.1)


def is_emotion6(path):
    return path.is_dir() and (path / "ground_truth.txt").is_file() and (path / "images").is_dir()


def accepts_emotion6(path):
    """An explicit `emotion6` format needs `images/<emotion>/` (and `ground_truth.txt` for argmax labels)."""
    return path.is_dir() and (path / "images").is_dir()


def read_emotion6(root, options=None):
    """Records of Emotion6, labelled by folder (default) or by the argmax of `ground_truth.txt`."""
    mode = options.emotion6_labels if options is not None else "folder"
    if mode not in EMOTION6_LABELS:
        raise ValueError(f"emotion6_labels must be one of {EMOTION6_LABELS}, got {mode!r}")
    records = _folder_records(root) if mode == "folder" else _argmax_records(root)
    logger.info("Emotion6 (%s labels): %d images (the paper: %s)", mode, len(records), f"{EMOTION6_PAPER_IMAGES:,}")
    return Listing({UNSPLIT: records}, list(EKMAN6), EMOTION6_RATIOS)


def _folder_records(root):
    records = []
    for folder in class_folders(root / "images"):
        label = normalise_label(folder.name, folder)
        records += [Record(file, label, file.relative_to(root).as_posix()) for file in iter_image_files([folder])]
    return records


def _argmax_records(root):
    """Records of `ground_truth.txt` rows labelled by their top emotion; tied rows dropped (counted in the log)."""
    truth = root / "ground_truth.txt"
    if not truth.is_file():
        raise ValueError(f"{root}: emotion6_labels='argmax' needs ground_truth.txt")
    records, ties = [], []
    for number, line in enumerate(truth.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if not line.strip():
            continue
        name, probabilities = _parse_truth_line(line, f"{truth} line {number}")
        top = max(probabilities)
        winners = [emotion for emotion, p in zip(EKMAN6, probabilities) if p == top]
        relative = Path("images") / name
        if len(winners) > 1:
            ties.append(relative.as_posix())
            continue
        records.append(Record(root / relative, winners[0], relative.as_posix()))
    if ties:
        logger.info("Emotion6: %d row(s) of ground_truth.txt dropped, their top emotion is a tie: %s%s",
                    len(ties), ", ".join(ties[:5]), ", ..." if len(ties) > 5 else "")  # fmt: skip
    return records


def _parse_truth_line(line, where):
    """`(image_filename, six emotion probabilities)` of one `ground_truth.txt` line (neutral read, not returned)."""
    line = line.strip()
    fields = [field.strip() for field in (line.split("\t") if "\t" in line else line.split())]
    if len(fields) != 10:
        raise ValueError(f"{where}: expected file, valence, arousal and 7 probabilities, got {line!r}")
    try:
        probabilities = [float(value) for value in fields[3:10]]
    except ValueError:
        raise ValueError(f"{where}: probabilities are not numbers: {line!r}") from None
    return fields[0], probabilities[: len(EKMAN6)]
