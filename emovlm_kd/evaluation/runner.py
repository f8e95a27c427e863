"""Evaluation runs: load a bundle (or a bare Qwen2-VL for the zero-shot baseline), run batched inference once over a
dataset split, aggregate with `emovlm_kd.evaluation.report` and write the report files. Shared by `evaluate` and `table1`.

    from emovlm_kd.evaluation.runner import bind_labels, evaluate_model
    from emovlm_kd.hub import load_model
    model, processor, zero_shot = load_model("runs/demo/model", bare_vlm=True)
    model, perm = bind_labels(model, processor, zero_shot, dataset.features["label"].names)
    report = evaluate_model(model, processor, dataset, "results/fi", zero_shot=zero_shot, label_perm=perm)
"""

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emovlm_kd.data import load_image_dataset
from emovlm_kd.data.splitfile import SPLITS_FILE, SplitMismatchError, apply_splits, read_splits
from emovlm_kd.errors import UsageError, few
from emovlm_kd.folders import folder_conflicts, staged_folder
from emovlm_kd.runtime import resolve_device

from .report import (
    PARTS,
    accuracy_table,
    build_report,
    prediction_records,
    render_markdown,
    write_json,
    write_jsonl,
    write_text,
)

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "predictions.jsonl", "report.md", "confusion_matrix.png", "complementarity.png")


class LabelMismatchError(ValueError):
    """The model's (or teacher's) label names are not the dataset's; the message names the differences."""


class ModelLoadError(ValueError):
    """A model id or folder that does not load (or is neither a bundle nor a Qwen2-VL checkpoint)."""


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def _normalise(name):
    return str(name).strip().lower()


def dataset_label_names(dataset):
    """The names of the `label` column's `ClassLabel`, in id order."""
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"the dataset's `label` column must be a ClassLabel, got {feature!r}")
    return list(names)


def align_labels(source_labels, target_labels, what="model"):
    """`perm` with `perm[j]` = the index in `source_labels` of `target_labels[j]` (names compared case-insensitively).

    Reorders a model's outputs into the dataset's label order: `scores[:, perm]`. Different label sets raise
    `LabelMismatchError` naming the labels missing on either side.
    """
    source = [_normalise(label) for label in source_labels]
    target = [_normalise(label) for label in target_labels]
    if len(set(source)) != len(source):
        raise LabelMismatchError(f"the {what}'s labels contain duplicates: {source}")
    if set(source) != set(target) or len(source) != len(target):
        missing = [label for label in target if label not in source]
        extra = [label for label in source if label not in target]
        raise LabelMismatchError(
            f"the {what}'s labels {source} are not the dataset's {target}: "
            f"missing from the {what}: {missing or 'none'}; not in the dataset: {extra or 'none'}"
        )
    return [source.index(label) for label in target]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def bind_labels(model, processor, zero_shot, labels):
    """`(model, perm)` ready for a dataset with `labels`.

    Zero-shot: `model` is a bare VLM, wrapped with a fresh head and gate whose labels are `labels` (identity perm;
    only the VLM branch is reported). Bundle: `perm` reorders its outputs into `labels` order
    (`LabelMismatchError` when the label sets differ).
    """
    if zero_shot:
        from modeling_emovlm_kd import EmoVLMKDForImageClassification

        wrapped = EmoVLMKDForImageClassification.from_vlm(model, [str(label) for label in labels], processor=processor)
        return wrapped.eval(), list(range(len(labels)))
    return model, align_labels(model.config.labels, labels, "model")


def load_teacher(model_id, *, device=None, dtype=None, trust_remote_code=False):
    """`(teacher, image_processor)`: an `AutoModelForImageClassification` (e.g. a fine-tuned ViT) and its processor;
    the code the checkpoint ships runs only with `trust_remote_code`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    kwargs = {"dtype": dtype} if dtype is not None else {}
    teacher = AutoModelForImageClassification.from_pretrained(model_id, use_safetensors=True,
                                                              trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return teacher.eval().to(resolve_device(device)), processor


def teacher_label_names(teacher):
    return [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def part_parameters(model, zero_shot=False, teacher=None):
    """Parameter counts per part, as the paper's Table 2 lists them (EmoVLM-KD = VLM + head + gate)."""
    vlm = count_parameters(model.vlm)
    counts = {"vlm": vlm}
    if not zero_shot:
        head, gate = count_parameters(model.distill_head), count_parameters(model.gate)
        counts.update({"distill": head, "emovlm_kd": vlm + head + gate})
    if teacher is not None:
        counts["teacher"] = count_parameters(teacher)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------------


def take(dataset, limit=None, seed=0):
    """A stratified sample of `limit` rows of `dataset` (all of it when None): each class gets its share of `limit`
    in proportion to its count (`stratified_quota`), its rows drawn with `seed`; the rows keep the dataset's order.
    (`--limit 16` on a dataset sorted by class then holds every class, not the first two.)"""
    import numpy as np

    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    labels = np.asarray(dataset["label"])
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), quota, replace=False)
              for label, quota in zip(classes, stratified_quota(counts, limit)) if quota]
    return dataset.select(sorted(int(i) for i in np.concatenate(chosen)))


def stratified_quota(counts, total):
    """Rows per class for a sample of `total`: one for every class first when `total` allows it, the rest in
    proportion to the classes' remaining counts, rounded by largest remainder (ties: the lower class index)."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64)
    quota = np.minimum(counts, 1) if total >= len(counts) else np.zeros_like(counts)
    left, rest = counts - quota, total - int(quota.sum())
    share = left * rest / max(1, int(left.sum()))
    quota = quota + np.floor(share).astype(np.int64)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    return quota


def load_split(source, split, limit=None, *, splits=None, model=None, **options):
    """One split of `emovlm_kd.data.load_image_dataset(source, **options)`, cut to a stratified `limit` rows;
    `UsageError` when absent.

    The split's ids come from a split file when there is one: `splits` (`--splits FILE`), else the one a trained
    model folder holds (`model/splits.json`, the split it was trained on), so evaluation never sees a training
    image. A model trained on another dataset (none of its split's images here) evaluates the dataset's own split;
    a dataset that holds only some of them (changed since training) is refused.
    """
    record_path = splits or _model_split_file(model)
    try:
        if record_path is None:
            data = load_image_dataset(source, splits=[split], **options)  # only this split's images are checked
        else:
            data = _apply_split_file(load_image_dataset(source, **options), record_path, explicit=bool(splits))
    except SplitMismatchError as error:
        raise UsageError(f"--dataset {source}: {error}") from None
    except ValueError as error:
        if "has no split" in str(error):  # the loader's "the dataset has no split 'test'" (not a layout's "no split")
            raise UsageError(f"--split: {error}")
        raise UsageError(f"--dataset: cannot load {source!r}: {error}")
    except OSError as error:
        raise UsageError(f"--dataset: cannot load {source!r}: {error}")
    if split not in data:
        raise UsageError(f"--split: {source!r} has no split {split!r}; it has {', '.join(data)}")
    return take(data[split], limit)


def _model_split_file(model):
    path = Path(str(model)) / SPLITS_FILE if model is not None else None
    return path if path is not None and path.is_file() else None


def _apply_split_file(data, record_path, explicit):
    record = read_splits(record_path)
    known = {row_id for part in data.values() for row_id in part["id"]}
    if not explicit and not known.intersection(record["test"]):
        logger.info("the model's split (%s) is of another dataset: evaluating this dataset's own split", record_path)
        return data
    logger.info("using the split in %s", record_path)
    return apply_splits(data, record, where=str(record_path))


@torch.inference_mode()
def _teacher_probs(teacher, inputs):
    """The teacher's probabilities for its processor's `inputs` (built by a data path worker; pinned on CUDA)."""
    from emovlm_kd.inference import to_model

    return teacher(**to_model(teacher, inputs, non_blocking=True)).logits.float().softmax(-1).cpu()


def dataset_batches(dataset, batch_size):
    """`emovlm_kd.datapath.Planned` batches of `dataset`'s rows, one per round of `sharded_batches` (this process's
    share; an empty batch in a round where it has none, so every process joins every round's gather): each row's
    `source` its encoded image (`{"bytes", "path"}`: the image column read with `Image(decode=False)`, one batch's
    rows at a time, nothing decoded here), `meta` the rows' labels, ids (the `id` column, else the row's index) and
    paths (a row stored as a path, not as bytes: its path)."""
    import datasets

    from emovlm_kd.collection import Row
    from emovlm_kd.datapath import Planned
    from emovlm_kd.inference import sharded_batches

    columns = [name for name in ("image", "label", "id") if name in dataset.column_names]
    undecoded = dataset.select_columns(columns)
    feature = undecoded.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode:
        undecoded = undecoded.cast_column("image", datasets.Image(decode=False))  # bytes and paths: decoded later
    for number, mine in enumerate(sharded_batches(range(len(dataset)), batch_size)):
        part = undecoded[mine] if mine else {name: [] for name in columns}
        ids = [str(i) for i in part["id"]] if "id" in part else [str(i) for i in mine]
        rows = [Row(position, row_id, source) for position, row_id, source in zip(mine, ids, part["image"])]
        meta = {"references": [int(label) for label in part["label"]], "ids": ids,
                "paths": [_stored_path(source) for source in part["image"]]}
        yield Planned(number, 1, rows, meta)


def _stored_path(source):
    """The path of a row's image when it is stored as a file (a path without bytes), else None."""
    if isinstance(source, dict):
        return None if source.get("bytes") else source.get("path")
    return str(source) if isinstance(source, (str, Path)) else None


def predict_split(model, processor, dataset, *, label_perm=None, teacher=None, teacher_processor=None,
                  teacher_perm=None, batch_size=8, vlm_mode=None, seed=0, desc="evaluate", num_workers=None):
    """Batched inference once over `dataset` (`image`, `label`, optional `id`): per-sample arrays in dataset order.

    Returns a dict: `references` (N,), `ids`, `paths`, `final_probs`, `distill_probs`, `vlm_scores` (N, C, in the
    dataset's label order), `vlm_found` (N,), `vlm_answers` (generated text or None), `teacher_probs` (or None),
    and `final_probs_uncalibrated`, `distill_probs_uncalibrated`: the same before temperature scaling (the model's
    logits times the config's `gate_calibration_temperature` / `head_calibration_temperature`). The model sees each
    image with its long side limited to `config.max_image_side`; the teacher sees it as its training cache did.

    The data path (`emovlm_kd.datapath.planned_loader`): `num_workers` DataLoader processes (default
    `datapath.default_workers`; 0: in this process) decode the images, prepare them and run the processor (and the
    teacher's) while the model computes; the main process reads one batch's rows at a time, undecoded
    (`dataset_batches`), so no split is ever held in memory whole. On CUDA the batches are pinned and copied
    without blocking. The arrays do not depend on `num_workers`.

    Under torchrun each round of `batch_size` x processes rows is split between the processes
    (`emovlm_kd.inference.sharded_batches`) and gathered back in order on every process: the same arrays as one
    process gives, up to float rounding (sampled answers in `generate` mode with `config.vlm_do_sample` excepted).
    """
    from tqdm.auto import tqdm

    from emovlm_kd import distributed
    from emovlm_kd.datapath import default_workers, planned_loader
    from emovlm_kd.inference import gather_in_order

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = default_workers(distributed.local_processes())
    torch.manual_seed(seed)  # generate mode may sample (config.vlm_do_sample): the same numbers on a rerun
    num_labels = len(dataset_label_names(dataset))
    perm = torch.as_tensor(label_perm if label_perm is not None else range(num_labels), dtype=torch.long)
    step = _RowPredictor(model, processor, perm, teacher, teacher_perm, vlm_mode)
    loader = planned_loader(dataset_batches(dataset, batch_size), processor, model.config, num_workers=num_workers,
                            pin_memory=model.device.type == "cuda",
                            teacher_processor=teacher_processor if teacher is not None else None)
    parts = []
    disable = None if distributed.is_main_process() else True
    with tqdm(total=len(dataset), desc=desc, unit="img", file=sys.stderr, disable=disable) as bar:
        for batch in loader:
            local = [step(batch)] if batch["rows"] else []
            gathered = gather_in_order(local)
            parts += gathered
            bar.update(sum(len(part["references"]) for part in gathered))
    return _merge_parts(parts)


class _RowPredictor:
    """One prepared batch of dataset rows (`emovlm_kd.datapath.PreparedBatches`) -> its per-sample values
    (`predict_split`'s keys), for one pass over a frozen model (its prompt prefix encoded once: one
    `PromptPrefixCache` per pass)."""

    def __init__(self, model, processor, perm, teacher, teacher_perm, vlm_mode):
        from emovlm_kd.inference import PromptPrefixCache

        self.model, self.processor, self.perm, self.vlm_mode = model, processor, perm, vlm_mode
        self.teacher, self.teacher_perm = teacher, teacher_perm
        self.temperatures = {"final_probs": model.config.gate_calibration_temperature,
                             "distill_probs": model.config.head_calibration_temperature}
        self.prompt_cache = PromptPrefixCache()

    def __call__(self, batch):
        from emovlm_kd.errors import InputError
        from emovlm_kd.inference import run_batch

        meta, perm = batch["meta"], self.perm
        if batch["errors"]:
            bad = [f"{meta['ids'][i]} ({message})" for i, message in sorted(batch["errors"].items())]
            raise InputError(f"the dataset holds images that do not read: {few(bad, 3)}")
        output = run_batch(self.model, self.processor, None, inputs=batch["inputs"], vlm_mode=self.vlm_mode,
                           prompt_cache=self.prompt_cache)
        part = {"paths": list(meta["paths"])}
        for key, logits in (("final_probs", output.logits), ("distill_probs", output.distill_logits)):
            part[key] = logits.softmax(-1)[:, perm]
            part[f"{key}_uncalibrated"] = (logits * self.temperatures[key]).softmax(-1)[:, perm]
        part["vlm_scores"] = output.vlm_scores[:, perm]
        part["vlm_found"] = output.vlm_answer_found.bool()
        texts = output.get("generated_text")
        part["vlm_answers"] = list(texts) if texts is not None else [None] * len(batch["rows"])
        if self.teacher is not None:
            probs = _teacher_probs(self.teacher, batch["teacher_inputs"])
            part["teacher_probs"] = probs[:, self.teacher_perm] if self.teacher_perm is not None else probs
        part["references"] = list(meta["references"])
        part["ids"] = list(meta["ids"])
        return part


_TENSOR_KEYS = ("final_probs", "distill_probs", "vlm_scores", "vlm_found", "teacher_probs", "final_probs_uncalibrated",
                "distill_probs_uncalibrated")


def _merge_parts(parts):
    """`predict_split`'s dict from the per-batch parts, in order."""
    result = {key: torch.cat([p[key] for p in parts]).numpy() if parts and key in parts[0] else None
              for key in _TENSOR_KEYS}
    answers = [a for p in parts for a in p["vlm_answers"]]
    result.update(references=np.asarray([r for p in parts for r in p["references"]], dtype=np.int64),
                  ids=[i for p in parts for i in p["ids"]], paths=[x for p in parts for x in p["paths"]],
                  vlm_answers=answers if any(a is not None for a in answers) else None)
    return result


def part_predictions(arrays, zero_shot=False):
    """`(predictions, probabilities)` per part from `predict_split`'s arrays; a VLM answer naming no label is -1.

    The VLM's scores count as probabilities (for ECE) only when every sample got a distribution (score mode);
    in zero-shot runs the head and the gate are untrained and left out.
    """
    vlm_pred = np.where(arrays["vlm_found"], arrays["vlm_scores"].argmax(-1), -1)
    predictions = {"vlm": vlm_pred}
    probabilities = {}
    if arrays["vlm_found"].all() and np.allclose(arrays["vlm_scores"].sum(-1), 1.0, atol=1e-3):
        probabilities["vlm"] = arrays["vlm_scores"]
    if not zero_shot:
        for part, key in (("distill", "distill_probs"), ("emovlm_kd", "final_probs")):
            predictions[part] = arrays[key].argmax(-1)
            probabilities[part] = arrays[key]
    if arrays.get("teacher_probs") is not None:
        predictions["teacher"] = arrays["teacher_probs"].argmax(-1)
        probabilities["teacher"] = arrays["teacher_probs"]
    return predictions, probabilities


def calibration_inputs(model, arrays, zero_shot=False):
    """`(temperatures, uncalibrated probabilities)` of the parts the model calibrates (the head and EmoVLM-KD), for
    the report's ECE before and after temperature scaling; empty for the zero-shot baseline."""
    if zero_shot:
        return {}, {}
    config = model.config
    temperatures = {"distill": config.head_calibration_temperature, "emovlm_kd": config.gate_calibration_temperature}
    uncalibrated = {"distill": arrays["distill_probs_uncalibrated"], "emovlm_kd": arrays["final_probs_uncalibrated"]}
    return temperatures, uncalibrated


def evaluate_model(model, processor, dataset, output_dir=None, *, zero_shot=False, label_perm=None, teacher=None,
                   teacher_processor=None, teacher_perm=None, batch_size=8, vlm_mode=None, meta=None, plots=True,
                   n_bins=15, seed=0, desc="evaluate", num_workers=None):
    """Run inference once over `dataset`, build the report and (with `output_dir`) write `REPORT_FILES` there.

    `model` is an `EmoVLMKDForImageClassification` (for zero-shot, one from `bind_labels`); `label_perm` and
    `teacher_perm` reorder model and teacher outputs into the dataset's label order (see `align_labels`);
    `num_workers`: the data path's worker processes (`predict_split`). Returns the report dict (also
    `report.json`). Under torchrun the inference is sharded (`predict_split`) and only the main process writes the
    files.
    """
    labels = dataset_label_names(dataset)
    started = time.perf_counter()
    arrays = predict_split(model, processor, dataset, label_perm=label_perm, teacher=teacher,
                           teacher_processor=teacher_processor, teacher_perm=teacher_perm, batch_size=batch_size,
                           vlm_mode=vlm_mode, seed=seed, desc=desc, num_workers=num_workers)
    elapsed = time.perf_counter() - started
    logger.info("inference on %d samples took %.1f s (%.2f img/s)", len(arrays["references"]), elapsed,
                len(arrays["references"]) / max(elapsed, 1e-9))
    predictions, probabilities = part_predictions(arrays, zero_shot=zero_shot)
    meta = dict(meta or {})
    meta.setdefault("vlm_mode", vlm_mode or model.config.vlm_mode)
    meta.setdefault("batch_size", batch_size)
    temperatures, uncalibrated = calibration_inputs(model, arrays, zero_shot)
    report = build_report(labels, arrays["references"], predictions, probabilities, meta=meta,
                          parameters=part_parameters(model, zero_shot, teacher), n_bins=n_bins,
                          temperatures=temperatures, uncalibrated_probabilities=uncalibrated)
    if output_dir is not None and _is_main_process():  # under torchrun every process holds the report; one writes
        write_outputs(report, arrays, predictions, probabilities, output_dir, plots=plots)
    return report


def _is_main_process():
    from emovlm_kd import distributed

    return distributed.is_main_process()


def report_folder_conflicts(output_dir):
    """What in folder `output_dir` a report did not write: names other than `REPORT_FILES` (and the temp files of
    our killed writes), and report names that are folders (e.g. a `report.json/` of the user's). A folder holding
    any is the user's, never replaced. `[]` when absent."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return folder_conflicts(folder, REPORT_FILES)


def check_report_folder(output_dir):
    """`FileExistsError` unless `output_dir` can be replaced as a whole by a report: absent, or a folder holding
    report files only (`report_folder_conflicts`, named in the message), and neither a file nor the current
    folder or one above it."""
    folder, here = Path(output_dir).resolve(), Path.cwd().resolve()
    if folder == here or folder in here.parents:
        raise FileExistsError(f"{output_dir} is the current folder or holds it: the report replaces its folder as a "
                              "whole, so give a folder inside it (e.g. results/NAME)")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder")
    conflicts = report_folder_conflicts(folder)
    if conflicts:
        raise FileExistsError(f"{output_dir} holds files that are not a report's ({few(conflicts)}): the report "
                              "replaces its folder as a whole, so give a new or a report-only folder")


def write_outputs(report, arrays, predictions, probabilities, output_dir, plots=True):
    """The report's files written all or nothing: report.json, predictions.jsonl, report.md and the figures
    (`REPORT_FILES`) go into a temp folder beside `output_dir` (`emovlm_kd.folders.staged_folder`: a
    `.NAME.emovlm-kd-PID-TOKEN.tmp` no user folder is named), which then replaces `output_dir` by renames:
    `output_dir` holds the old set or the new one, never a mix. A folder holding anything else raises
    `FileExistsError` before a file is written (`check_report_folder`); an OS error (a full disk) raises
    `emovlm_kd.folders.WriteError` naming `output_dir`, left as it was."""
    output_dir = Path(output_dir).resolve()
    check_report_folder(output_dir)
    with staged_folder(output_dir) as staging:
        images = _write_report_files(report, arrays, predictions, probabilities, staging, plots)
    logger.info("wrote %s", ", ".join(str(output_dir / name) for name in ["report.json", "predictions.jsonl",
                                                                         "report.md", *images]))
    return output_dir


def _write_report_files(report, arrays, predictions, probabilities, folder, plots):
    """Every report file into `folder` (created if missing); the names of the figures written."""
    folder.mkdir(parents=True, exist_ok=True)
    records = prediction_records(report["labels"], arrays["references"], predictions, probabilities,
                                 ids=arrays["ids"], paths=arrays["paths"], extra={"vlm_answer": arrays["vlm_answers"]})
    write_jsonl(folder / "predictions.jsonl", records)
    images = []
    if plots:
        from .plots import plot_complementarity, plot_confusion_matrices

        images.append(plot_confusion_matrices(report, folder / "confusion_matrix.png").name)
        chart = plot_complementarity(report, folder / "complementarity.png")
        if chart is not None:
            images.append(chart.name)
    write_text(folder / "report.md", render_markdown(report, images=images))
    write_json(folder / "report.json", report)
    return images


__all__ = [
    "PARTS",
    "LabelMismatchError",
    "ModelLoadError",
    "accuracy_table",
    "align_labels",
    "bind_labels",
    "calibration_inputs",
    "check_report_folder",
    "dataset_batches",
    "dataset_label_names",
    "evaluate_model",
    "load_split",
    "load_teacher",
    "part_parameters",
    "part_predictions",
    "predict_split",
    "report_folder_conflicts",
    "take",
    "teacher_label_names",
    "write_outputs",
]
