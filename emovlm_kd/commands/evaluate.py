"""`emovlm-kd evaluate`: benchmark a model on one dataset split and write the report.

    emovlm-kd evaluate --model runs/demo/model --dataset data/FI --output-dir results/fi
    emovlm-kd evaluate --model runs/fi/model --dataset data/FI --teacher runs/fi/teacher --output-dir results/fi
    emovlm-kd evaluate --model Qwen/Qwen2-VL-7B-Instruct --dataset data/FI --output-dir results/fi-zero-shot
    emovlm-kd evaluate --model runs/fi/model --dataset data/FI --output-dir results/fi --num-workers 7

Writes `report.json` (accuracy and macro-F1 per part, complementarity, the gate on disagreements, ECE),
`predictions.jsonl` (one line per sample), `confusion_matrix.png`, `complementarity.png` and `report.md`, all or
nothing: the set replaces `--output-dir` as a whole, so a folder holding other files is refused before any work.
A bare Qwen2-VL checkpoint gives the zero-shot baseline: the VLM branch alone.

The images go through predict's data path (`emovlm_kd.datapath`): `--num-workers` DataLoader processes (default:
the available cores less one, at most 8) decode them, prepare them and run the processor (and the teacher's) while
the model computes; the split is read a batch at a time, never whole. The report does not depend on the workers.

    torchrun --nproc_per_node 4 -m emovlm_kd.cli evaluate --model runs/fi/model --dataset data/FI --output-dir results/fi

shards the inference between the processes (each on its own GPU, or the CPU); the main process alone writes the
report, the same as one process's (up to float rounding).

An EmoVLM-KD bundle loads with the installed classes, checked before any work (exit status 3 and one line naming
the file when it cannot be used); no code from a model folder runs unless `--trust-remote-code` (for checkpoints
that are not EmoVLM-KD bundles: a zero-shot VLM or a teacher that ship their own code).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.options import EvaluationArguments
from emovlm_kd.settings import (
    REQUIRED,
    DataPathArguments,
    DatasetArguments,
    ProtocolArguments,
    RuntimeArguments,
    dataset_options,
    help_field,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvaluateArguments(ProtocolArguments, RuntimeArguments, DataPathArguments, EvaluationArguments,
                        DatasetArguments):
    model: str = help_field("EmoVLM-KD bundle folder or Hub id, or a bare Qwen2-VL", REQUIRED)
    dataset: str = help_field("dataset folder, manifest, save_to_disk folder or Hub id (see emovlm_kd.data)", REQUIRED)
    teacher: str | None = help_field("an AutoModelForImageClassification folder or Hub id (the ViT teacher) to compare")
    splits: str | None = help_field("split file to take the split's ids from (default: the model folder's "
                                    "splits.json, the split it was trained on, when it holds this dataset's images)")
    trust_remote_code: bool = help_field("run the code a checkpoint that is not an EmoVLM-KD bundle ships (a zero-shot "
                                         "VLM, the teacher); EmoVLM-KD bundles always load with the installed classes",
                                         False)


ARGUMENTS = EvaluateArguments


def run(args: EvaluateArguments) -> int:
    _check_paths(args)
    from emovlm_kd.training.runlock import hold_run_locks_of

    with hold_run_locks_of(args.output_dir, purpose="emovlm-kd evaluate"):  # a report into a run folder: one writer
        return _evaluate(args)


def _evaluate(args):
    from emovlm_kd.data.loading import dataset_format_of
    from emovlm_kd.evaluation.report import accuracy_table
    from emovlm_kd.evaluation.runner import (
        dataset_label_names,
        evaluate_model,
        load_split,
    )
    from emovlm_kd.runtime import resolve_device, resolve_dtype

    from emovlm_kd import protocol

    if args.protocol and args.split_rule is None:
        args.split_rule = protocol.preset(args.protocol)["split_rule"]
    dataset = load_split(args.dataset, args.split, args.limit, splits=args.splits, model=args.model,
                         **dataset_options(args))
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    labels = dataset_label_names(dataset)
    model, processor, zero_shot, perm = _load_model(args, labels, device, dtype)
    if not zero_shot:
        protocol.apply_to_model(model, processor, args.protocol)
    teacher, teacher_processor, teacher_perm = _load_teacher(args.teacher, labels, device, dtype,
                                                             args.trust_remote_code)
    meta = {"model": str(args.model), "dataset": str(args.dataset), "split": args.split, "limit": args.limit,
            **({"protocol": args.protocol} if args.protocol else {}),
            "dataset_format": dataset_format_of(args.dataset, args.dataset_format)}
    if args.teacher:
        meta["teacher"] = str(args.teacher)
    try:
        report = evaluate_model(model, processor, dataset, args.output_dir, zero_shot=zero_shot, label_perm=perm,
                                teacher=teacher, teacher_processor=teacher_processor, teacher_perm=teacher_perm,
                                batch_size=args.batch_size, vlm_mode=args.vlm_mode, meta=meta,
                                num_workers=args.num_workers)
    except FileExistsError as error:  # a file put into --output-dir while the run went on
        raise UsageError(f"--output-dir: {error}")
    from emovlm_kd import distributed

    if not distributed.is_main_process():  # under torchrun the main process wrote the report and prints it
        return 0
    kind = "zero-shot VLM" if zero_shot else "EmoVLM-KD"
    print(f"{kind} on {args.dataset} ({args.split}, {report['num_samples']} samples):")
    print(accuracy_table(report))
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


def _check_paths(args):
    """`UsageError` listing every problem with the inputs at once, before anything heavy is imported or loaded: a
    `--model`/`--teacher` that is neither a model folder here nor a Hub model in the cache or on a reachable Hub (one
    probe; a training run's folder is pointed to its model/), a `--dataset` that is neither here nor on the Hub, a
    missing `--splits` file, an `--output-dir` the report may not replace."""
    from emovlm_kd.hubaccess import HubAccess
    from emovlm_kd.modelcheck import local_model_folder

    hub, found = HubAccess(), []
    for flag, name in (("--model", args.model), ("--teacher", args.teacher)):
        if not name:
            continue
        try:
            local_model_folder(name)
        except OSError as error:  # a path-looking name that does not exist: never sent to the Hub
            found.append(f"{flag}: {error}")
            continue
        problem = hub.model_problem(name)
        if problem:
            found.append(f"{flag} {name}: {problem}")
    problem = hub.dataset_problem(args.dataset)
    if problem:
        found.append(f"--dataset {args.dataset}: {problem}")
    if args.splits and not Path(args.splits).is_file():
        found.append(f"--splits {args.splits}: no such file")
    try:
        if Path(args.output_dir).exists():  # nothing to check in a folder not made yet (and torch not imported)
            from emovlm_kd.evaluation.runner import check_report_folder

            check_report_folder(args.output_dir)
    except FileExistsError as error:
        found.append(f"--output-dir: {error}")
    if found:
        raise UsageError(found[0] if len(found) == 1 else "cannot evaluate:\n  " + "\n  ".join(found))


def _load_model(args, labels, device, dtype):
    """`(model, processor, zero_shot, perm into the dataset's labels)`; `ModelCheckError` (exit 3) propagates."""
    from emovlm_kd.evaluation.runner import LabelMismatchError, bind_labels
    from emovlm_kd.hub import load_model

    try:
        model, processor, zero_shot = load_model(args.model, device=device, dtype=dtype,
                                                 trust_remote_code=args.trust_remote_code, bare_vlm=True,
                                                 quantize=args.quantize)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")
    try:
        model, perm = bind_labels(model, processor, zero_shot, labels)
    except LabelMismatchError as error:
        raise UsageError(f"--model: {error}")
    return model, processor, zero_shot, perm


def _load_teacher(teacher_id, labels, device, dtype, trust_remote_code=False):
    """`(teacher, image processor, perm into the dataset's labels)`, or three Nones without `--teacher`."""
    from emovlm_kd.evaluation.runner import LabelMismatchError, align_labels, load_teacher, teacher_label_names

    if not teacher_id:
        return None, None, None
    try:
        teacher, teacher_processor = load_teacher(teacher_id, device=device, dtype=dtype,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"--teacher: cannot load {teacher_id!r}: {error}")
    try:
        return teacher, teacher_processor, align_labels(teacher_label_names(teacher), labels, "teacher")
    except LabelMismatchError as error:
        raise UsageError(f"--teacher: {error}")
