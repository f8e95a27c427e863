"""From a labelled image dataset and a Qwen2-VL checkpoint to one Hub model: `run_training(cfg)`.

Every stage is skipped when its finished output already exists, so a rerun after a crash picks up where it
stopped; Trainer checkpoints resume inside a stage. Works under torchrun / accelerate launch.

One run at a time writes in RUN (`RUN/.lock`, see `runlock`). Stage and cache keys see the image files (size and
modification time, or content with `--verify-data content`: see `load_data`). The export records the sha256 of
every file it wrote and a rerun rebuilds RUN/model and RUN/eval_results.json when one is missing or differs.
"""

import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path

import torch

from emovlm_kd import folders
from emovlm_kd import protocol as protocols
from emovlm_kd.determinism import deterministic
from emovlm_kd.distributed import barrier, is_main_process, main_process_decides, state
from emovlm_kd.settings import dataset_options
from emovlm_kd.logs import tidy_transformers_bars
from emovlm_kd.training.cache import (
    TensorCache,
    files_fingerprint,
    fingerprint,
    fingerprint_module,
    respect_umask,
    sha256_file,
    with_files_fingerprint,
)
from emovlm_kd.training.calibration import calibrate_bundle, calibration_rows, test_calibration
from emovlm_kd.training.config import DEMO, DEMO_BACKBONE, check_instruction_sources, demo_backbone
from emovlm_kd.training.demo import prepare_demo_inputs
from emovlm_kd.training.gatedata import add_sampled_answers, gate_data_summary, gate_training_set
from emovlm_kd.training.heads import (
    gate_head_input,
    gate_outputs,
    head_outputs,
    run_stage3,
    run_stage4,
    vlm_vectors,
)
from emovlm_kd.training.instructions import instruction_mix, run_stage0
from emovlm_kd.training.modelcard import model_card, widget_example_names, write_widget_examples
from emovlm_kd.training.passes import vlm_pass_cache
from emovlm_kd.training.runlock import hold_run_lock
from emovlm_kd.training.sft import run_stage1
from emovlm_kd.runtime import resolve_dtype, run_device
from emovlm_kd.training.stage import run_stage
from emovlm_kd.training.teacher import check_teacher_labels, run_stage2, teacher_cache

logger = logging.getLogger(__name__)

PARTS = ("vlm", "distill", "teacher", "emovlm_kd")
EXPORT_RECORD = "files.json"  # RUN/stage5_export/files.json: {RUN-relative path: sha256} of what the export wrote


def load_data(cfg, data_source, dataset=None):
    """The run's DatasetDict: `dataset` when preflight read it already, else read now (`preflight.read_dataset`: the
    loader's or the `--splits` file's split, identical images across splits reported or refused); train capped by
    max_train_samples; every split's fingerprint made to cover its image files (`see_image_files`), so that every
    stage and cache key does."""
    from emovlm_kd.training.preflight import read_dataset

    if dataset is None:
        dataset = read_dataset(cfg, data_source)
    if cfg.max_train_samples:
        dataset["train"] = dataset["train"].shuffle(seed=cfg.seed).select(range(min(cfg.max_train_samples,
                                                                                  len(dataset["train"]))))
    return see_image_files(dataset, cfg.verify_data)


def see_image_files(dataset, verify):
    """Each split with a `datasets` fingerprint that also covers its images: every file's size and mtime_ns
    (`verify="stat"`) or size and sha256 (`"content"`), the bytes a dataset holds itself hashed in both modes
    (`cache.files_fingerprint`). Computed by the main process, once per split, and shared."""
    started = time.perf_counter()
    for name, split in dataset.items():
        files = main_process_decides(partial(files_fingerprint, split, verify))
        dataset[name] = with_files_fingerprint(split, files)
    logger.info("image files fingerprinted (%s): %d rows in %.1f s", verify,
                sum(len(split) for split in dataset.values()), time.perf_counter() - started)
    return dataset


def record_splits(run_dir, dataset, data_source, options, *, splits, seed):
    """RUN/splits.json: the ids of every split this run used, with the dataset's fingerprint and the settings
    that made the split (`options`: the run's `dataset_options`; `splits`: its `--splits` file)."""
    from emovlm_kd.data.splitfile import SPLITS_FILE, split_record, write_splits

    record = split_record(dataset, data_source, from_file=splits, seed=seed, **{
        k: v for k, v in options.items() if k != "seed"})
    if is_main_process():
        write_splits(run_dir / SPLITS_FILE, record)
    return record


def accuracy(predictions, labels):
    return round(float((predictions == labels).float().mean()), 4)


def run_training(cfg, dataset=None):
    """Run every stage, holding RUN/.lock throughout (`RunFolderBusy`, a `UsageError`, when another run holds it),
    with deterministic algorithms where torch has them (`emovlm_kd.determinism`); returns the test-split results
    written to RUN/eval_results.json. `dataset`: the `--dataset` as `preflight` read it (None: read here)."""
    state()  # joins the process group under torchrun before any collective
    tidy_transformers_bars()
    torch.manual_seed(cfg.seed)
    groups = cfg.stage_groups()  # each stage's settings, built once; each stage gets its own
    # the paper's mix needs conversation/reasoning answers: stop before any work
    check_instruction_sources(groups.instruction, cfg.dataset)
    with hold_run_lock(cfg.output_dir), deterministic():  # the lock before anything is written in RUN
        results = run_stages(cfg, groups, dataset)
        if is_main_process():
            respect_umask(*owned_folders(Path(cfg.output_dir)), only_private=True)
    return results


def owned_folders(run_dir):
    """The folders of RUN that the run writes (each stage's, the caches, the model, the demo's base models): their
    files written 0600 by safetensors get the umask's mode at the end of a run."""
    return [*sorted(run_dir.glob("stage[0-9]_*")), *(run_dir / name for name in ("cache", "model", "base"))]


def run_stages(cfg, groups, dataset=None):
    """Every stage, in order, each skipped when done with the same inputs; the results. `groups`: the run's
    `StageGroups` (`cfg.stage_groups()`): each stage gets its own group; the rest of `cfg` is read here and handed
    on as values."""
    from configuration_emovlm_kd import EmoVLMKDConfig

    run_dir = start_run(Path(cfg.output_dir), dataclasses.asdict(cfg))
    data_source, vlm_path, teacher_path = resolve_inputs(run_dir, cfg.dataset, cfg.vlm, cfg.teacher, seed=cfg.seed)
    if groups.instruction.instructions == DEMO:  # the synthetic dataset's reasoning answers, written beside its images
        from emovlm_kd.data.synthetic import REASONING_FILE

        groups.instruction.instructions = str(Path(data_source) / REASONING_FILE)

    logger.info("== Data: %s", data_source)
    dataset = load_data(cfg, data_source, dataset)
    names = dataset["train"].features["label"].names
    logger.info("splits: %s; labels: %s", {k: len(v) for k, v in dataset.items()}, ", ".join(names))
    split_file = record_splits(run_dir, dataset, data_source, dataset_options(cfg), splits=cfg.splits,
                               seed=cfg.seed)
    if cfg.teacher_trained:
        check_teacher_labels(cfg.teacher_trained, names)
    model_fields = protocols.model_fields(cfg)  # the model-side knobs the bundle's config records
    prompt_config = EmoVLMKDConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                                   **model_fields)

    logger.info("== Stage 0: instruction data")
    instructions = run_stage0(groups.instruction, run_dir, dataset, prompt_config)
    mix = instruction_mix(instructions)
    logger.info("== Stage 1: instruction tuning (%s)", vlm_path)
    merged_dir = run_stage1(groups.sft, run_dir, dataset, vlm_path, instructions, seed=cfg.seed, dtype=cfg.dtype,
                            max_image_side=cfg.max_image_side, chat_format=groups.instruction.chat_format)
    logger.info("== Stage 2: teacher (%s)", cfg.teacher_trained or teacher_path)
    teacher_dir = Path(cfg.teacher_trained) if cfg.teacher_trained else \
        run_stage2(groups.teacher, run_dir, dataset, teacher_path, seed=cfg.seed)

    distill, gate = groups.distill, groups.gate
    bundle, processor = load_bundle_to_train(
        merged_dir, names, cfg.dtype, head_hidden_sizes=distill.head_hidden_sizes, head_dropout=distill.head_dropout,
        gate_type=gate.gate_type, vlm_vector=gate.vlm_vector, max_image_side=cfg.max_image_side, **model_fields)
    logger.info("== Caches: one VLM pass and one teacher pass per image")
    cache = TensorCache(run_dir / "cache")
    passes = cache_passes(cache, dataset, bundle, processor, teacher_dir, dtype=cfg.dtype, batch_size=cfg.batch_size)
    add_sampled_answers(gate, cache, passes, bundle, processor, dataset, seed=cfg.seed, batch_size=cfg.batch_size)
    gate_rows, calibration_part = calibration_rows(gate.gate_data, passes["val"]["labels"], cfg.seed) \
        if "val" in passes else (None, [])

    logger.info("== Stage 3: distillation")
    dtype = resolve_dtype(cfg.dtype)
    train = passes["train"]
    bundle.distill_head.requires_grad_(True).float()
    run_stage3(distill, run_dir, bundle, train["image_embeds"].float(), train["teacher_logits"], train["labels"],
               seed=cfg.seed)
    bundle.distill_head.requires_grad_(False).to(dtype)
    outputs = branch_outputs(bundle, passes, gate.vlm_vector, gate.gate_input)

    logger.info("== Stage 4: gate (%s, on %s data)", gate.gate_type, gate.gate_data)
    gate_data = gate_training_set(gate.gate_data, {s: o["vlm_scores"] for s, o in outputs.items()},
                                  {s: o["head_probs"] for s, o in outputs.items()},
                                  {s: p["labels"] for s, p in passes.items()}, passes["train"].get("vlm_samples"),
                                  val_rows=gate_rows)
    bundle.gate.requires_grad_(True).float()
    run_stage4(gate, run_dir, bundle, *gate_data, seed=cfg.seed)
    bundle.gate.requires_grad_(False).to(dtype)
    with torch.inference_mode():
        outputs["test"]["gate_logits"] = gate_outputs(bundle.gate, outputs["test"]["vlm_scores"],
                                                      outputs["test"]["head_probs"])

    logger.info("== Calibration: temperatures of the gate and the head, fitted on val images they never trained on")
    val_ids = dataset["val"]["id"] if "val" in dataset and "id" in dataset["val"].column_names else None
    calibration = calibrate_bundle(bundle, passes, outputs, (gate_rows, calibration_part), val_ids=val_ids,
                                   seed=cfg.seed)
    results = test_results(passes["test"], outputs)
    if calibration:
        results["calibration"] = test_calibration(calibration, passes["test"]["labels"], {
            "gate": outputs["test"]["gate_logits"], "head": outputs["test"]["head_logits"]})
    results.update(instruction_mix=mix, gate_data=gate_data_summary(
        gate.gate_data, passes, gate_rows, samples=gate.gate_samples, temperature=gate.gate_temperature))
    # the widget's example pictures are the synthetic dataset generator's: only for a model trained on it
    examples = cfg.dataset == DEMO
    card = model_card(cfg, names, results, vlm_path, backbone_type=bundle.config.vlm_config.model_type,
                      examples=widget_example_names(names) if examples else ())
    export(run_dir, bundle, processor, card, results, split_file, examples=examples, push_to_hub=cfg.push_to_hub)
    return results


def start_run(run_dir, settings):
    """RUN/ with the run's settings (`settings`, a dict) in train_config.json, and what killed writes left behind
    removed (main process, under the run lock)."""
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(run_dir)
        folders.atomic_write_text(run_dir / "train_config.json", json.dumps(settings, indent=2))
    barrier()
    return run_dir


def remove_partial_writes(run_dir):
    """Delete the temp files and folders of the writes a killed run left (`emovlm_kd.folders.PARTIAL_WRITE`:
    `.NAME.emovlm-kd-PID-TOKEN.tmp` or `.old` of a process that is gone; a cache's can be gigabytes, an export's
    a whole model). Nothing else is touched."""
    leftovers = folders.remove_partial_writes(run_dir)
    if leftovers:
        logger.info("removed %d temp file(s) or folder(s) of writes a killed run left", len(leftovers))


def resolve_inputs(run_dir, dataset, vlm, teacher, *, seed):
    """(dataset, VLM, teacher) locations: the user's, or the demo's built under RUN/ where a setting is `demo` (only
    those: a run on the user's dataset gets no synthetic images)."""
    data_source, vlm_path, teacher_path = dataset, vlm, teacher
    wanted = {"data": dataset == DEMO, "vlm": demo_backbone(vlm) is not None, "teacher": teacher == DEMO}
    if any(wanted.values()):
        demo_data, demo_vlm, demo_teacher = prepare_demo_inputs(run_dir, seed, **wanted,
                                                                backbone=demo_backbone(vlm) or DEMO_BACKBONE)
        data_source, vlm_path = demo_data or data_source, demo_vlm or vlm_path
        teacher_path = demo_teacher or teacher_path
    return data_source, vlm_path, teacher_path


def load_bundle_to_train(merged_dir, names, dtype, **options):
    """The tuned VLM wrapped into a new bundle (fresh head and gate; `options`: `from_vlm`'s), frozen, on the run's
    device and `dtype`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    processor = AutoProcessor.from_pretrained(merged_dir)
    vlm = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=resolve_dtype(dtype), use_safetensors=True)
    bundle = EmoVLMKDForImageClassification.from_vlm(vlm, names, processor=processor, **options)
    bundle = bundle.to(run_device()).eval()
    bundle.requires_grad_(False)
    return bundle, processor


def cache_passes(cache, dataset, bundle, processor, teacher_dir, *, dtype, batch_size):
    """Per split: pooled visual features and label log-likelihoods (one VLM pass), teacher logits, labels."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    teacher = AutoModelForImageClassification.from_pretrained(
        teacher_dir, dtype=resolve_dtype(dtype), use_safetensors=True
    ).to(run_device()).eval()
    teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)
    passes = {}
    for split in (s for s in ("train", "val", "test") if s in dataset):
        passes[split] = dict(vlm_pass_cache(cache, bundle, processor, dataset[split], split, batch_size=batch_size))
        passes[split].update(teacher_cache(cache, teacher, teacher_processor, dataset[split], split,
                                           batch_size=batch_size))
        passes[split]["labels"] = torch.tensor(dataset[split]["label"])
    return passes


def branch_outputs(bundle, passes, vlm_vector, gate_input):
    """Per split, what the gate reads: the head's logits, what the gate takes of them (`head_probs`: probabilities,
    or the logits with `gate_input` logits) and the VLM branch's vectors (`vlm_vector`; under the official answer
    protocol the sampled answer's)."""
    outputs = {}
    for split, tensors in passes.items():
        head_logits = head_outputs(bundle.distill_head, tensors["image_embeds"])
        vlm_scores = tensors.get("vlm_answer")
        if vlm_scores is None:
            vlm_scores = vlm_vectors(tensors["vlm_log_likelihoods"], vlm_vector)
        outputs[split] = {"head_logits": head_logits, "head_probs": gate_head_input(head_logits, gate_input),
                          "vlm_scores": vlm_scores}
    return outputs


def vlm_predictions(test_pass):
    """The VLM branch's test predictions: the argmax of its label scores, or (answer_protocol official) the label of
    its sampled answer, -1 (wrong) where the answer names none."""
    if "vlm_answer" in test_pass:
        return torch.where(test_pass["vlm_answer_found"], test_pass["vlm_answer"].argmax(-1), -1)
    return test_pass["vlm_log_likelihoods"].argmax(-1)


def test_results(test_pass, outputs):
    """The four parts' accuracies on the test split (what RUN/eval_results.json holds)."""
    y, test = test_pass["labels"], outputs["test"]
    return {
        "split": "test",
        "num_samples": len(y),
        "accuracy": {
            "vlm": accuracy(vlm_predictions(test_pass), y),
            "distill": accuracy(test["head_logits"].argmax(-1), y),
            "teacher": accuracy(test_pass["teacher_logits"].argmax(-1), y),
            "emovlm_kd": accuracy(test["gate_logits"].argmax(-1), y),
        },
    }


def export(run_dir, bundle, processor, card, results, split_file, *, examples=False, push_to_hub=None):
    """Stage 5 (`run_stage`): RUN/model (the Hub bundle, with the split it was trained on and, with `examples`, the
    widget's example pictures) and RUN/eval_results.json, rewritten when their inputs change or a file of theirs no
    longer has the sha256 the export recorded (RUN/stage5_export/files.json, the stage's output); then the push to
    the Hub repo `push_to_hub`."""
    from emovlm_kd.data.splitfile import SPLITS_FILE
    from emovlm_kd.hub import save_bundle

    key = fingerprint("export", fingerprint_module(bundle), str(card), results, split_file["dataset"]["fingerprint"],
                      bundle.config.gate_calibration_temperature, bundle.config.head_calibration_temperature)

    def write(record):
        # the synthetic pictures go with the synthetic dataset only: a model of real data gets no made-up examples
        pictures = write_widget_examples(run_dir / "examples", bundle.config.labels) if examples else {}
        save_bundle(bundle, processor, run_dir / "model", model_card=card,
                    extra_files={SPLITS_FILE: run_dir / SPLITS_FILE, **pictures})
        folders.atomic_write_text(run_dir / "eval_results.json", json.dumps(results, indent=2))
        write_export_record(run_dir, record)

    run_stage(run_dir, "stage5_export", key, EXPORT_RECORD, lambda stage: (write, {"model": str(run_dir / "model")}),
              skipped="[export] RUN/model is up to date, not rewritten", log=logger,
              damage=lambda stage: export_damage(run_dir, stage.dir),
              damaged="[export] %s: rebuilding RUN/model and eval_results.json")
    if is_main_process() and push_to_hub:
        push_folder(run_dir / "model", push_to_hub)
        logger.info("pushed %s to the Hub as %s", run_dir / "model", push_to_hub)
    barrier()


def exported_files(run_dir):
    """RUN-relative paths of what the export writes: every file of RUN/model, and eval_results.json."""
    model = run_dir / "model"
    files = sorted(path.relative_to(run_dir).as_posix() for path in model.rglob("*") if path.is_file())
    return [*files, "eval_results.json"]


def write_export_record(run_dir, record):
    """{RUN-relative path: sha256} of every file the export wrote, as JSON in `record` (the stage's temp file of
    RUN/stage5_export/files.json, renamed into place before its DONE.json is written)."""
    digests = {name: sha256_file(run_dir / name) for name in exported_files(run_dir)}
    Path(record).write_text(json.dumps(digests, indent=1), encoding="utf-8")


def export_damage(run_dir, stage_dir):
    """What is wrong with the export, in words naming the file (the first one found), or None when every file it
    recorded is there with the same sha256 (files added to RUN/model since are not its)."""
    try:
        recorded = json.loads((stage_dir / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"{stage_dir / EXPORT_RECORD}, the record of the exported files, is missing or unreadable"
    for name, digest in recorded.items():
        path = run_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} differs from the file the export wrote (sha256)"
    return None


def push_folder(folder, repo_id):
    """Upload the Hub folder as it is (weights, config, code files, processor, model card)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="EmoVLM-KD model")


def format_results(results):
    """The four accuracies as a small text table."""
    width = max(len(p) for p in PARTS)
    lines = [f"test accuracy on {results['num_samples']} images", "-" * (width + 12)]
    lines += [f"{part:<{width}}  {100 * results['accuracy'][part]:6.2f} %" for part in PARTS]
    return "\n".join(lines)
