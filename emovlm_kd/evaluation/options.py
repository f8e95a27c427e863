"""The command-line flags every evaluation command shares (`emovlm-kd evaluate`, `emovlm-kd table1`) and their
checks. Imports nothing heavy: the commands add these flags before `--help` is printed."""

from emovlm_kd.errors import UsageError
from emovlm_kd.runtime import add_device_arguments


def add_common_arguments(parser):
    """--split, --vlm-mode, --batch-size, --device, --dtype, --limit, --output-dir."""
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--vlm-mode", choices=["score", "generate"], default=None,
                        help="how the VLM branch answers (default: the model's config; the paper generates)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    add_device_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a stratified sample of N images (every class in proportion, seeded)")
    parser.add_argument("--output-dir", required=True, help="folder for the report files")


def check_common_arguments(args):
    """`UsageError` for a batch size or limit below 1."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")


def add_dataset_arguments(parser):
    """How a dataset without a split file is split (as `emovlm-kd train` and `emovlm-kd split` take them)."""
    parser.add_argument("--dataset-format", default=None,
                        help="fi, emoset, emotion6, flickr, instagram, imagefolder, manifest or hub (default: detected)")
    parser.add_argument("--split-ratios", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                        help="shares where the dataset has no split (default: the dataset's protocol)")
    parser.add_argument("--seed", type=int, default=None, help="seed of a derived split (default: 42)")
    parser.add_argument("--emotion6-labels", choices=["folder", "argmax"], default=None,
                        help="Emotion6 labels: the class folder (default, the paper's) or the argmax of ground_truth.txt")
    parser.add_argument("--vote-rule", choices=["majority", "unanimous", "plurality"], default=None,
                        help="Flickr/Instagram: the votes that make a label (default: majority, 2 of 3)")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="save_to_disk/Hub/parquet datasets: the column holding the labels (default: label, "
                             "labels, emotion or the first ClassLabel)")


DATASET_OPTIONS = ("val_fraction", "seed", "dataset_format", "split_ratios", "emotion6_labels", "vote_rule",
                   "label_column")


def dataset_options(settings):
    """`load_image_dataset` keyword arguments from the flags of `add_dataset_arguments` or a run's `TrainConfig`
    (the same names); unset ones (None, or absent) are left out, so the loader's defaults apply."""
    options = {name: getattr(settings, name, None) for name in DATASET_OPTIONS}
    if options["split_ratios"]:
        options["split_ratios"] = tuple(options["split_ratios"])
    return {k: v for k, v in options.items() if v is not None}
