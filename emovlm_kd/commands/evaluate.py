"""`emovlm-kd evaluate`: benchmark a model on one dataset split and write the report.

    emovlm-kd evaluate --model runs/demo/model --dataset data/FI --output-dir results/fi
    emovlm-kd evaluate --model runs/fi/model --dataset data/FI --teacher runs/fi/teacher --output-dir results/fi
    emovlm-kd evaluate --model Qwen/Qwen2-VL-7B-Instruct --dataset data/FI --output-dir results/fi-zero-shot

Writes `report.json` (accuracy and macro-F1 per part, complementarity, the gate on disagreements, ECE),
`predictions.jsonl` (one line per sample), `confusion_matrix.png`, `complementarity.png` and `report.md`.
A bare Qwen2-VL checkpoint gives the zero-shot baseline: the VLM branch alone.
"""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def add_common_arguments(parser):
    """Flags shared with `table1`."""
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--vlm-mode", choices=["score", "generate"], default=None,
                        help="how the VLM branch answers (default: the model's config; the paper generates)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: as saved)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--output-dir", required=True, help="folder for the report files")


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="EmoVLM-KD bundle folder or Hub id, or a bare Qwen2-VL")
    parser.add_argument("--dataset", required=True,
                        help="dataset folder, manifest, save_to_disk folder or Hub id (see emovlm_kd.data)")
    parser.add_argument("--teacher", default=None,
                        help="an AutoModelForImageClassification folder or Hub id (the ViT teacher) to compare")
    add_common_arguments(parser)


def check_common_arguments(args):
    from emovlm_kd.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")


def torch_dtype(name):
    import torch

    return getattr(torch, name) if name else None


def load_split(source, split, limit=None):
    """One split of `emovlm_kd.data.load_image_dataset(source)`, cut to `limit` rows; `UsageError` when absent."""
    from emovlm_kd.errors import UsageError
    from emovlm_kd.data import load_image_dataset

    from emovlm_kd.evaluation.runner import take

    try:
        data = load_image_dataset(source, splits=[split])  # only this split's images are checked
    except ValueError as error:
        if "no split" in str(error):
            raise UsageError(f"--split: {error}")
        raise UsageError(f"--dataset: cannot load {source!r}: {error}")
    except OSError as error:
        raise UsageError(f"--dataset: cannot load {source!r}: {error}")
    if split not in data:
        raise UsageError(f"--split: {source!r} has no split {split!r}; it has {', '.join(data)}")
    return take(data[split], limit)


def run(args):
    from emovlm_kd.errors import UsageError

    from emovlm_kd.evaluation.report import accuracy_table
    from emovlm_kd.evaluation.runner import (
        LabelMismatchError,
        align_labels,
        bind_labels,
        dataset_label_names,
        default_device,
        evaluate_model,
        load_model,
        load_teacher,
        teacher_label_names,
    )

    check_common_arguments(args)
    dataset = load_split(args.dataset, args.split, args.limit)
    labels = dataset_label_names(dataset)
    device, dtype = default_device(args.device), torch_dtype(args.dtype)
    try:
        model, processor, zero_shot = load_model(args.model, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")
    try:
        model, perm = bind_labels(model, processor, zero_shot, labels)
    except LabelMismatchError as error:
        raise UsageError(f"--model: {error}")
    teacher = teacher_processor = teacher_perm = None
    if args.teacher:
        try:
            teacher, teacher_processor = load_teacher(args.teacher, device=device, dtype=dtype)
        except (OSError, ValueError) as error:
            raise UsageError(f"--teacher: cannot load {args.teacher!r}: {error}")
        try:
            teacher_perm = align_labels(teacher_label_names(teacher), labels, "teacher")
        except LabelMismatchError as error:
            raise UsageError(f"--teacher: {error}")
    meta = {"model": str(args.model), "dataset": str(args.dataset), "split": args.split, "limit": args.limit}
    if args.teacher:
        meta["teacher"] = str(args.teacher)
    report = evaluate_model(model, processor, dataset, args.output_dir, zero_shot=zero_shot, label_perm=perm,
                            teacher=teacher, teacher_processor=teacher_processor, teacher_perm=teacher_perm,
                            batch_size=args.batch_size, vlm_mode=args.vlm_mode, meta=meta)
    kind = "zero-shot VLM" if zero_shot else "EmoVLM-KD"
    print(f"{kind} on {args.dataset} ({args.split}, {report['num_samples']} samples):")
    print(accuracy_table(report))
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0
