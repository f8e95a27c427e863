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

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.options import (
    add_common_arguments,
    add_dataset_arguments,
    check_common_arguments,
    dataset_options,
)

logger = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="EmoVLM-KD bundle folder or Hub id, or a bare Qwen2-VL")
    parser.add_argument("--dataset", required=True,
                        help="dataset folder, manifest, save_to_disk folder or Hub id (see emovlm_kd.data)")
    parser.add_argument("--teacher", default=None,
                        help="an AutoModelForImageClassification folder or Hub id (the ViT teacher) to compare")
    parser.add_argument("--splits", default=None,
                        help="split file to take the split's ids from (default: the model folder's splits.json, "
                             "the split it was trained on, when it holds this dataset's images)")
    add_dataset_arguments(parser)
    add_common_arguments(parser)


def run(args):
    from emovlm_kd.evaluation.report import accuracy_table
    from emovlm_kd.evaluation.runner import (
        LabelMismatchError,
        bind_labels,
        dataset_label_names,
        default_device,
        evaluate_model,
        load_model,
        load_split,
        torch_dtype,
    )

    check_common_arguments(args)
    dataset = load_split(args.dataset, args.split, args.limit, splits=args.splits, model=args.model,
                         **dataset_options(args))
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
    teacher, teacher_processor, teacher_perm = _load_teacher(args.teacher, labels, device, dtype)
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


def _load_teacher(teacher_id, labels, device, dtype):
    """`(teacher, image processor, perm into the dataset's labels)`, or three Nones without `--teacher`."""
    from emovlm_kd.evaluation.runner import LabelMismatchError, align_labels, load_teacher, teacher_label_names

    if not teacher_id:
        return None, None, None
    try:
        teacher, teacher_processor = load_teacher(teacher_id, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UsageError(f"--teacher: cannot load {teacher_id!r}: {error}")
    try:
        return teacher, teacher_processor, align_labels(teacher_label_names(teacher), labels, "teacher")
    except LabelMismatchError as error:
        raise UsageError(f"--teacher: {error}")
