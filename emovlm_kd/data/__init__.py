"""Image classification data for EmoVLM-KD: one `DatasetDict` with `image`, `label`, `id` from any layout in use.

    from emovlm_kd.data import load_image_dataset, make_synthetic_dataset

    data = load_image_dataset("data/FI")               # <root>/{train,val,test}/<class>/* (official code)
    data = load_image_dataset("data/EmoSet-118K")      # info.json + {train,val,test}.json
    data = load_image_dataset("data/Emotion6")         # images/<emotion>/N.jpg + ground_truth.txt
    data = load_image_dataset("data/flickr.csv")       # manifest: path,label[,split]
    data = load_image_dataset("user/some-emotion-set") # a save_to_disk folder or a Hub dataset id
    data["train"].features["label"].names               # canonical order: Mikels 8, Ekman 6, negative/positive

    root = make_synthetic_dataset("/tmp/synthetic")    # a tiny, learnable dataset in the official layout

Splits are among "train", "val", "test". Where "val" is missing it is a stratified `val_fraction` of train (seeded,
deterministic); Emotion6 and manifests without a `split` column get a stratified 80/10/10 train/val/test split.
Local image files are checked once while loading: unreadable ones are skipped with one warning naming them.

The modules: `loading` (detect the source, `load_image_dataset`), `readers` (one function per local layout),
`hfdatasets` (`save_to_disk` folders and Hub datasets), `build` (records to the `DatasetDict`), `splits`,
`checks` (unreadable files, empty classes and splits), `records` (what a reader returns), `synthetic`.
"""

from emovlm_kd.data.loading import load_image_dataset
from emovlm_kd.data.records import SPLITS
from emovlm_kd.data.splits import stratified_split
from emovlm_kd.data.synthetic import make_synthetic_dataset

__all__ = ["SPLITS", "load_image_dataset", "make_synthetic_dataset", "stratified_split"]
