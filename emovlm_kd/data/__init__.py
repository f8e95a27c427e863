"""Image classification data for EmoVLM-KD: one `DatasetDict` with `image`, `label`, `id` from any layout in use,
the paper's five datasets read as their authors distribute them.

    from emovlm_kd.data import load_image_dataset, make_synthetic_dataset

    data = load_image_dataset("data/FI")               # <emotion>/*.jpg, no split: stratified 80/5/15
    data = load_image_dataset("downloads")             # emotion_dataset.tar unpacked here: downloads/emotion_dataset/
    data = load_image_dataset("data/EmoSet-118K")      # info.json + {train,val,test}.json
    data = load_image_dataset("data/Emotion6")         # images/<emotion>/N.jpg + ground_truth.txt: 80/10/10
    data = load_image_dataset("data/Flickr", vote_rule="majority")  # flickr{1,2,3}_icassp2016_dataset.csv + images
    data = load_image_dataset("data/flickr", dataset_format="flickr")  # {train,val,test}/{positive,negative}/*.jpg
    data = load_image_dataset("data/FI-split")         # <root>/{train,val,test}/<class>/* (official code)
    data = load_image_dataset("data/list.csv")         # manifest: path,label[,split]
    data = load_image_dataset("user/some-emotion-set") # a save_to_disk folder or a Hub dataset id
    data = load_image_dataset("user/set", label_column="sentiment")  # its label column has another name
    data = load_image_dataset("data/FI", dataset_format="fi", split_ratios=(0.7, 0.1, 0.2), seed=1)
    data["train"].features["label"].names               # canonical order: Mikels 8, Ekman 6, negative/positive

    root = make_synthetic_dataset("/tmp/synthetic")    # a tiny, learnable dataset in the official layout

A folder holding nothing but one folder (an archive unpacked into it) is read through it; a folder of images
without labels, rows naming files outside the dataset folder and a train split of one class are refused, before
any image is opened where the files show it.

Splits are among "train", "val", "test". A dataset's own split is kept; where "val" is missing it is a stratified
`val_fraction` of train (seeded, deterministic). Datasets without a split are split stratified and seeded by
`split_ratios` (defaults: FI, Flickr, Instagram 80/5/15; Emotion6, class folders and manifests 80/10/10). Local
image files are checked once while loading: unreadable ones are skipped with one warning naming them.

The modules: `loading` (detect the source, `load_image_dataset`), `readers` (the registry of local layouts, one
module each: `folders` (class folders, FI), `emoset`, `emotion6`, `katsurai` (Flickr, Instagram), `manifest`),
`hfdatasets` (`save_to_disk` folders and Hub datasets), `build` (records to the `DatasetDict`), `splits`, `checks`
(unreadable files, empty classes and splits), `records` (what a reader returns), `synthetic`.
"""

from emovlm_kd.data.emotion6 import EMOTION6_LABELS
from emovlm_kd.data.katsurai import VOTE_RULES
from emovlm_kd.data.loading import load_image_dataset
from emovlm_kd.data.readers import DATASET_FORMATS
from emovlm_kd.data.records import SPLITS
from emovlm_kd.data.splits import stratified_split
from emovlm_kd.data.synthetic import make_synthetic_dataset

__all__ = [
    "DATASET_FORMATS", "EMOTION6_LABELS", "SPLITS", "VOTE_RULES",
    "load_image_dataset", "make_synthetic_dataset", "stratified_split",
]  # fmt: skip
