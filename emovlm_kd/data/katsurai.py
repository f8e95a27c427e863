"""Flickr and Instagram sentiment sets as their authors distribute them (Katsurai & Satoh, ICASSP 2016, "Image
Sentiment Analysis Using Latent Correlations Among Visual, Textual, and Sentiment Views";
https://mm.doshisha.ac.jp/en/2016/12/01/image-sentiment-analysis/ and mm.doshisha.ac.jp/senti/CrossSentiment.html).

Three workers rated each image on a five-point scale; the authors publish, per image id, "the number of users for
each sentiment polarity", in three batches per site. The files and columns, as public code reading them has them
(found by code search: A. Ortis's Flickr crawler (Univ. Catania, 2016) opens `"flickr" + str(i+1) +
"_icassp2016_dataset.csv"`, skips the header and reads `ImageID, Num_of_Positive, Num_of_Neutral, Num_of_Negative`
by position; two other projects read `flickr1_icassp2016_dataset.csv` by these header names):

    <root>/flickr1_icassp2016_dataset.csv    header: ImageID,Num_of_Positive,Num_of_Neutral,Num_of_Negative
    <root>/flickr2_icassp2016_dataset.csv    rows:   <Flickr photo id>,<votes>,<votes>,<votes>  (3 votes in all)
    <root>/flickr3_icassp2016_dataset.csv
    <root>/instagram{1,2,3}_icassp2016_dataset.csv   the same for Instagram (file names by analogy: unverified)

The images are not distributed: the user fetches them by id, and crawlers save them in different ways: A. Ortis's
crawler writes `images2/<ImageID>` with no extension (its `+".jpg"` is commented out), others `<ImageID>.jpg`, or
`<sentiment>/<ImageID>.jpg` (a public ImageSentimentAnalysis script moves them into `training_set/<sentiment>/`).
Any file under `<root>`, in any sub-folder, named `<ImageID>` or `<ImageID>.<image extension>` is used; a file
without an image extension is taken when its first bytes are an image format's signature (JPEG, PNG, GIF, WebP,
BMP, TIFF: nothing is decoded here). Ids without an image are dropped with one warning that counts them. Fields may
carry spaces after the commas (one public loader splits on `\\s*,\\s*`).

Already split, without vote files: the EmoVLM-KD authors' own code for the paper's datasets (github sange1104/OSANet,
`data/README.md` and `dataloader.py`) reads `flickr/{train,val,test}/{positive,negative}/<label>_<n>.jpg` (and
`instagram/...`), labels from the folders; `--dataset-format flickr|instagram` reads that layout (its split kept),
as it reads unsplit `positive/` and `negative/` class folders (split 80/5/15). Detection reads both as class folders.

The binary label comes from the votes by `vote_rule`:
- "majority" (default): positive when more than half of the votes are positive (2 of 3), negative likewise;
  otherwise (neutral majority, or disputed) the id is dropped.
- "unanimous": every vote positive (or every vote negative); otherwise dropped.
- "plurality": more positive than negative votes (neutral votes ignored), or the reverse; a tie is dropped.
- a callable `(positive, neutral, negative) -> "positive" | "negative" | None` (None drops the id).
The loader logs the counts beside the paper's (Flickr 60,738, Instagram 42,832). No official split: a stratified,
seeded 80 / 5 / 15 split by default, the protocol of the large sets (`split_ratios` to change it).
"""

import csv
import logging
import os
from pathlib import Path

from emovlm_kd.data.folders import is_imagefolder, read_imagefolder
from emovlm_kd.data.records import UNSPLIT, Listing, Record
from emovlm_kd.data.splits import LARGE_SET_RATIOS
from emovlm_kd.images import IMAGE_EXTENSIONS
from emovlm_kd.labels import SENTIMENT2

logger = logging.getLogger(__name__)

VOTE_COLUMNS = ("ImageID", "Num_of_Positive", "Num_of_Neutral", "Num_of_Negative")
SITES = {  # name: (batch file pattern, images in the EmoVLM-KD paper)
    "flickr": ("flickr*_icassp2016_dataset.csv", 60_738),
    "instagram": ("instagram*_icassp2016_dataset.csv", 42_832),
}
MAX_NAMED = 10
IMAGE_SIGNATURES = (  # (offset, bytes) of the formats a crawler gets from Flickr/Instagram and Pillow reads
    (0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF87a"), (0, b"GIF89a"), (8, b"WEBP"), (0, b"BM"),
    (0, b"II*\x00"), (0, b"MM\x00*"),
)  # fmt: skip


def _majority(positive, neutral, negative):
    total = positive + neutral + negative
    return "positive" if 2 * positive > total else "negative" if 2 * negative > total else None


def _unanimous(positive, neutral, negative):
    total = positive + neutral + negative
    return "positive" if total and positive == total else "negative" if total and negative == total else None


def _plurality(positive, neutral, negative):
    return "positive" if positive > negative else "negative" if negative > positive else None


VOTE_RULES = {"majority": _majority, "unanimous": _unanimous, "plurality": _plurality}


def resolve_vote_rule(vote_rule):
    """The function of a `vote_rule` name, or the callable itself; a `ValueError` for anything else."""
    if callable(vote_rule):
        return vote_rule
    if vote_rule not in VOTE_RULES:
        raise ValueError(f"vote_rule must be one of {sorted(VOTE_RULES)} or a callable, got {vote_rule!r}")
    return VOTE_RULES[vote_rule]


def batch_files(site, path):
    """The vote files of `site` in the folder `path` (sorted), or `[path]` for a file."""
    return [path] if path.is_file() else sorted(path.glob(SITES[site][0]))


def is_flickr(path):
    return _is_site("flickr", path)


def is_instagram(path):
    return _is_site("instagram", path)


def _is_site(site, path):
    """A folder holding the site's batch files, or one such file (detection goes by the authors' file names)."""
    if path.is_file():
        return path.match(SITES[site][0])
    return path.is_dir() and bool(batch_files(site, path))


def accepts_votes_file(path):
    """What an explicit `flickr`/`instagram` format reads: also a vote file renamed by the user."""
    return path.is_file() and path.suffix.lower() == ".csv"


def accepts_sentiment_folders(path):
    """What an explicit `flickr`/`instagram` format reads without vote files: `{train,val,test}/{positive,negative}/`
    (the authors' OSANet layout) or unsplit `positive/` and `negative/` class folders."""
    return path.is_dir() and is_imagefolder(path)


def read_flickr(path, options=None):
    return read_votes("flickr", path, options)


def read_instagram(path, options=None):
    return read_votes("instagram", path, options)


def read_votes(site, path, options=None):
    """Records of the ids whose votes give a label by `options.vote_rule` and which have an image file."""
    rule_name = options.vote_rule if options is not None else "majority"
    rule = resolve_vote_rule(rule_name)
    root = path.parent if path.is_file() else path
    files = batch_files(site, path)
    if not files and accepts_sentiment_folders(path):
        return read_sentiment_folders(site, path)
    votes = {}
    for file in files:
        for image_id, counts in _read_vote_file(file):
            votes.setdefault(image_id, counts)  # an id repeated across batches keeps its first votes
    labels = {image_id: _checked_label(rule(*counts), image_id) for image_id, counts in votes.items()}
    labelled = {image_id: label for image_id, label in labels.items() if label is not None}
    images = _images_by_id(root, labelled)
    missing = [image_id for image_id in labelled if image_id not in images]
    records = [Record(images[i], label, images[i].relative_to(root).as_posix())
               for i, label in labelled.items() if i in images]  # fmt: skip
    _log_counts(site, rule_name, len(files), votes, labelled, missing, root)
    if not records:
        raise ValueError(
            f"{root}: none of the {len(labelled)} labelled {site} ids has an image file under it "
            "(the images are fetched separately and named <ImageID> or <ImageID>.jpg, in any sub-folder)"
        )
    return Listing({UNSPLIT: records}, list(SENTIMENT2), LARGE_SET_RATIOS)


def _checked_label(label, image_id):
    if label not in (None, *SENTIMENT2):
        raise ValueError(f"vote_rule gave {label!r} for id {image_id}: expected 'positive', 'negative' or None")
    return label


def _read_vote_file(file):
    """`[(image_id, (positive, neutral, negative))]` of one batch file (header by name; spaces around commas)."""
    with open(file, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, skipinitialspace=True))
    header = [name.strip() for name in rows[0]] if rows else []
    if not set(VOTE_COLUMNS) <= set(header):
        raise ValueError(f"{file}: expected the columns {', '.join(VOTE_COLUMNS)}, got the header {header}")
    columns = [header.index(name) for name in VOTE_COLUMNS]
    result = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(field.strip() for field in row):
            continue
        try:
            image_id, *counts = (row[i].strip() for i in columns)
            counts = tuple(int(count) for count in counts)
        except (IndexError, ValueError):
            raise ValueError(f"{file} line {number}: expected an id and three vote counts, got {row}") from None
        if not image_id or min(counts) < 0:
            raise ValueError(f"{file} line {number}: expected an id and three vote counts, got {row}")
        result.append((image_id, counts))
    return result


def read_sentiment_folders(site, root):
    """Flickr/Instagram as positive/negative class folders (split or not): labels from the folders."""
    listing = read_imagefolder(root)
    strays = sorted({record.label for records in listing.splits.values() for record in records} - set(SENTIMENT2))
    if strays:
        raise ValueError(f"{root}: {site} class folders must be {' and '.join(SENTIMENT2)}, found {strays}")
    count = sum(len(records) for records in listing.splits.values())
    logger.info("%s: %d images in positive/negative folders of %s (the paper: %s)", site.capitalize(), count, root,
                f"{SITES[site][1]:,}")  # fmt: skip
    return Listing(listing.splits, list(SENTIMENT2), LARGE_SET_RATIOS if UNSPLIT in listing.splits else None)


def _images_by_id(root, ids):
    """`{image id: path}` of the files under `root` named `<id>` or `<id>.<image extension>` for an id of `ids`; a
    file without an image extension counts when its first bytes are an image signature. Hidden files and folders
    are skipped; one id with two files is an error."""
    images, doubles = {}, []
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(names):
            path = Path(top) / name
            suffix = path.suffix.lower()
            image_id = path.stem if suffix in IMAGE_EXTENSIONS else name
            if image_id not in ids or name.startswith("."):
                continue
            if suffix not in IMAGE_EXTENSIONS and not looks_like_image(path):
                continue
            if image_id in images:
                doubles.append(image_id)
            images.setdefault(image_id, path)
    if doubles:
        raise ValueError(f"{root}: image id(s) with more than one file: {sorted(set(doubles))[:MAX_NAMED]}")
    return images


def looks_like_image(path):
    """Whether the first bytes of `path` are an image format's signature (read 16 bytes, decode nothing)."""
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return False
    return any(head[offset : offset + len(magic)] == magic for offset, magic in IMAGE_SIGNATURES)


def _log_counts(site, rule_name, file_count, votes, labelled, missing, root):
    """One info line with the counts beside the paper's; one warning counting the ids without an image file."""
    positive = sum(1 for label in labelled.values() if label == "positive")
    rule = rule_name if isinstance(rule_name, str) else getattr(rule_name, "__name__", "custom")
    logger.info(
        "%s (vote rule %r): %d ids in %d vote file(s): %d positive, %d negative, %d dropped as neutral or disputed; "
        "%d labelled (the paper: %s), %d of them with an image file",
        site.capitalize(), rule, len(votes), file_count, positive, len(labelled) - positive,
        len(votes) - len(labelled), len(labelled), f"{SITES[site][1]:,}", len(labelled) - len(missing),
    )  # fmt: skip
    if missing:
        more = ", ..." if len(missing) > MAX_NAMED else ""
        logger.warning(
            "%s: %d of %d labelled ids have no image file under %s: dropped (%s%s)",
            site.capitalize(), len(missing), len(labelled), root, ", ".join(missing[:MAX_NAMED]), more,
        )  # fmt: skip
