"""From a labelled image dataset and a Qwen2-VL checkpoint to one Hub model: `run_training(cfg)`.

Every stage is skipped when its finished output already exists, so a rerun after a crash picks up where it
stopped; Trainer checkpoints resume inside a stage. Works under torchrun / accelerate launch.
"""

import json
import logging
from pathlib import Path

import torch

from emovlm_kd.distributed import barrier, init_distributed, is_main_process
from emovlm_kd.training.cache import (
    TensorCache,
    atomic_write_text,
    fingerprint,
    fingerprint_module,
)
from emovlm_kd.training.heads import (
    gate_outputs,
    head_outputs,
    run_stage3,
    run_stage4,
    vlm_vectors,
)
from emovlm_kd.training.instructions import run_stage0
from emovlm_kd.training.passes import vlm_pass_cache
from emovlm_kd.training.sft import run_stage1
from emovlm_kd.training.stage import Stage, resolve_dtype
from emovlm_kd.training.teacher import check_teacher_labels, run_stage2, teacher_cache

logger = logging.getLogger(__name__)

PARTS = ("vlm", "distill", "teacher", "emovlm_kd")


def prepare_demo_inputs(run_dir, seed):
    """The embedded demo's synthetic dataset and tiny base models, written under RUN/ like real inputs."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_vlm

    run_dir = Path(run_dir)
    data_dir, vlm_dir, teacher_dir = run_dir / "data" / "synthetic", run_dir / "base" / "vlm", run_dir / "base" / "teacher"
    if is_main_process():
        make_synthetic_dataset(data_dir)
        if not (vlm_dir / "config.json").exists():
            processor = build_tiny_processor()
            vlm = build_tiny_vlm(processor.tokenizer, seed=seed, hidden_size=128, num_heads=4, num_layers=2,
                                 vision_dim=64, vision_depth=2)
            tmp = vlm_dir.with_name("vlm.tmp")
            vlm.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
            tmp.rename(vlm_dir)
        if not (teacher_dir / "config.json").exists():
            build_tiny_teacher(teacher_dir, seed)
    barrier()
    return data_dir, vlm_dir, teacher_dir


def build_tiny_teacher(folder, seed):
    """A small ViT classifier (random init) and its image processor, saved like a Hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=48, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, num_labels=2)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    ViTForImageClassification(config).save_pretrained(str(tmp))
    ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(str(tmp))
    tmp.rename(folder)


def load_data(cfg, data_source):
    from emovlm_kd.data import load_image_dataset

    dataset = load_image_dataset(data_source, val_fraction=cfg.val_fraction, seed=cfg.seed)
    for split in ("train", "test"):
        if split not in dataset:
            raise ValueError(f"dataset {data_source!r} has no {split} split (found: {', '.join(dataset)})")
    if cfg.max_train_samples:
        dataset["train"] = dataset["train"].shuffle(seed=cfg.seed).select(range(min(cfg.max_train_samples,
                                                                                  len(dataset["train"]))))
    return dataset


def accuracy(predictions, labels):
    return round(float((predictions == labels).float().mean()), 4)


def run_training(cfg):
    """Run every stage; returns the test-split results written to RUN/eval_results.json."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from configuration_emovlm_kd import EmoVLMKDConfig
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    init_distributed()
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    data_source, vlm_path, teacher_path = cfg.dataset, cfg.vlm, cfg.teacher
    if cfg.is_demo or cfg.dataset == "demo" or cfg.teacher == "demo":
        demo_data, demo_vlm, demo_teacher = prepare_demo_inputs(run_dir, cfg.seed)
        data_source = demo_data if cfg.dataset == "demo" else data_source
        vlm_path = demo_vlm if cfg.vlm == "demo" else vlm_path
        teacher_path = demo_teacher if cfg.teacher == "demo" else teacher_path

    logger.info("== Data: %s", data_source)
    dataset = load_data(cfg, data_source)
    names = dataset["train"].features["label"].names
    logger.info("splits: %s; labels: %s", {k: len(v) for k, v in dataset.items()}, ", ".join(names))
    if cfg.teacher_trained:
        check_teacher_labels(cfg.teacher_trained, names)
    prompt_config = EmoVLMKDConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    logger.info("== Stage 0: instruction data")
    instructions = run_stage0(cfg, run_dir, dataset, prompt_config)
    logger.info("== Stage 1: instruction tuning (%s)", vlm_path)
    merged_dir = run_stage1(cfg, run_dir, dataset, vlm_path, instructions)
    logger.info("== Stage 2: teacher (%s)", cfg.teacher_trained or teacher_path)
    teacher_dir = run_stage2(cfg, run_dir, dataset, teacher_path)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(cfg)
    processor = AutoProcessor.from_pretrained(merged_dir)
    vlm = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=dtype, use_safetensors=True)
    bundle = EmoVLMKDForImageClassification.from_vlm(
        vlm, names, processor=processor, head_hidden_sizes=cfg.head_hidden_sizes, head_dropout=cfg.head_dropout,
        gate_type=cfg.gate_type, vlm_vector=cfg.vlm_vector,
    ).to(device).eval()
    bundle.requires_grad_(False)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir, dtype=dtype, use_safetensors=True).to(device).eval()
    teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)

    logger.info("== Caches: one VLM pass and one teacher pass per image")
    cache = TensorCache(run_dir / "cache")
    splits = [s for s in ("train", "val", "test") if s in dataset]
    vlm_pass = {s: vlm_pass_cache(cfg, cache, bundle, processor, dataset[s], s) for s in splits}
    teacher_logits = {s: teacher_cache(cfg, cache, teacher, teacher_processor, dataset[s], s)["teacher_logits"]
                      for s in splits}
    labels = {s: torch.tensor(dataset[s]["label"]) for s in splits}

    logger.info("== Stage 3: distillation")
    bundle.distill_head.requires_grad_(True).float()
    run_stage3(cfg, run_dir, bundle, vlm_pass["train"]["image_embeds"].float(), teacher_logits["train"],
                      labels["train"])
    bundle.distill_head.requires_grad_(False).to(dtype)
    head_logits = {s: head_outputs(bundle.distill_head, vlm_pass[s]["image_embeds"]) for s in splits}
    head_probs = {s: v.softmax(-1) for s, v in head_logits.items()}
    vlm_scores = {s: vlm_vectors(vlm_pass[s]["vlm_log_likelihoods"], cfg.vlm_vector) for s in splits}

    logger.info("== Stage 4: gate (%s)", cfg.gate_type)
    gate_split = cfg.gate_train_split if cfg.gate_train_split in dataset else "train"
    bundle.gate.requires_grad_(True).float()
    run_stage4(cfg, run_dir, bundle, vlm_scores[gate_split], head_probs[gate_split], labels[gate_split])
    bundle.gate.requires_grad_(False).to(dtype)
    with torch.inference_mode():
        gate_logits = gate_outputs(bundle.gate, vlm_scores["test"], head_probs["test"])

    y = labels["test"]
    results = {
        "split": "test",
        "num_samples": len(y),
        "accuracy": {
            "vlm": accuracy(vlm_pass["test"]["vlm_log_likelihoods"].argmax(-1), y),
            "distill": accuracy(head_logits["test"].argmax(-1), y),
            "teacher": accuracy(teacher_logits["test"].argmax(-1), y),
            "emovlm_kd": accuracy(gate_logits.argmax(-1), y),
        },
    }
    from emovlm_kd.hub import save_bundle
    from emovlm_kd.training.modelcard import model_card

    card = model_card(cfg, names, results, vlm_path)
    export = Stage(run_dir, "stage5_export", fingerprint("export", fingerprint_module(bundle), card, results))
    if export.done and (run_dir / "model" / "config.json").exists():
        logger.info("[export] RUN/model is up to date, not rewritten")
    else:
        if is_main_process():
            save_bundle(bundle, processor, run_dir / "model", model_card=card)
            atomic_write_text(run_dir / "eval_results.json", json.dumps(results, indent=2))
        export.finish(model=str(run_dir / "model"))
    if is_main_process():
        if cfg.push_to_hub:
            push_folder(run_dir / "model", cfg.push_to_hub)
            logger.info("pushed %s to the Hub as %s", run_dir / "model", cfg.push_to_hub)
    barrier()
    return results


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
