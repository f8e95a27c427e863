"""The distillation and gate stages, timed both ways on the same random images and teacher logits; and stage 1
(`--train`): QLoRA steps per second and peak memory (`time_stage1`).

Ours is the training code itself: one batched pass caches what the stage needs (pooled encoder features for the head;
the VLM branch's vector and the head's probabilities for the gate), then `emovlm_kd.training.heads.train_head` /
`train_gate` (the functions stages 3 and 4 and the ablations call: HF `Trainer`, mini-batches of 32) run the epochs,
after one untimed warm-up call (imports).
The reference is the official per-image loop of `reference.py`. Teacher logits are precomputed for both (the
teacher's cost is left out of both).
"""

import copy
import logging
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from emovlm_kd.logs import quiet_libraries, route_trainer_logs
from emovlm_kd.training import heads
from emovlm_kd.training.config import TrainConfig

from .meters import MemoryMeter, OtherLoad, Stopwatch, sync
from .models import (
    CONFIGS,
    REAL_SIZES,
    TRAIN_7B_DEPTH,
    build_random_model,
    count_params,
    make_inputs,
    preset_widths,
    random_images,
)
from .reference import LR, train_gate_per_image, train_head_per_image

logger = logging.getLogger(__name__)

STAGE_MINIBATCH = 32
ALPHA, TAU = 0.5, 2.0
QUIET = {"save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}  # as the ablations train


@dataclass
class StageData:
    """The stages' images as model inputs (batched for ours, one per image for the reference) and their targets."""

    batches: list
    singles: list
    labels: torch.Tensor  # (N,), on the model's device
    teacher_logits: torch.Tensor  # (N, C), on the model's device
    new_tokens: list  # per image: its label's answer length (the reference's forced generation length)
    batch_size: int


def stage_data(model, processor, count, side, batch_size, seed):
    """`count` random images (seeded apart from the inference images), labels cycling over the labels, random
    teacher logits."""
    images = random_images(count, side, seed=seed + 1)
    num_labels = len(model.config.labels)
    labels = torch.arange(count, device=model.device) % num_labels
    generator = torch.Generator().manual_seed(seed)
    answer_lengths = [len(a) for a in model.config.label_answer_token_ids]
    return StageData(
        batches=[make_inputs(model, processor, images[i : i + batch_size]) for i in range(0, count, batch_size)],
        singles=[make_inputs(model, processor, [image]) for image in images],
        labels=labels,
        teacher_logits=torch.randn(count, num_labels, generator=generator).to(model.device),
        new_tokens=[answer_lengths[int(y)] for y in labels.tolist()],
        batch_size=batch_size,
    )


def stage_config(model, distill_epochs, gate_epochs, seed):
    """The training run's settings for stages 3 and 4 (the official code's learning rate, mini-batches of 32)."""
    return TrainConfig(
        alpha=ALPHA, tau=TAU, distill_epochs=distill_epochs, distill_lr=LR, distill_batch_size=STAGE_MINIBATCH,
        gate_epochs=gate_epochs, gate_lr=LR, gate_batch_size=STAGE_MINIBATCH, gate_type=model.config.gate_type,
        head_hidden_sizes=list(model.config.head_hidden_sizes), seed=seed,
    )


def _trainer_overrides(device):
    # the Trainer picks its own device: keep it on the CPU when the benchmark runs there
    return dict(QUIET, use_cpu=device.type != "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Ours: cache once, then the training stages' own functions
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def cache_head_inputs(model, batches):
    """Pooled encoder features (N, H), float32 on the CPU, as stage 3 trains on them."""
    return torch.cat([
        model.pool_image_features(model.encode_images(b["pixel_values"], b["image_grid_thw"]).pooler_output)
        .float().cpu()
        for b in batches
    ])


@torch.no_grad()
def cache_gate_inputs(model, batches):
    """(VLM vectors, head probabilities), each (N, C) float32 on the CPU: one score-mode pass per batch."""
    vlm_scores, head_probs = [], []
    for batch in batches:
        output = model(**batch, vlm_mode="score")
        vlm_scores.append(output.vlm_scores.float().cpu())
        head_probs.append(output.distill_logits.float().softmax(-1).cpu())
    return torch.cat(vlm_scores), torch.cat(head_probs)


def ours_distill(model, cfg, data):
    """Seconds (caching, training): the cached features, then `train_head` on a float32 copy of the head."""
    clock = Stopwatch(model.device)
    clock.start()
    features = cache_head_inputs(model, data.batches)
    cached = clock.stop()
    head = copy.deepcopy(model.distill_head).float().requires_grad_(True)
    tensors = (features, data.teacher_logits.float().cpu(), data.labels.cpu())
    return cached, _timed_training(heads.train_head, "distill_args", model, cfg, head, tensors)


def ours_gate(model, cfg, data):
    """Seconds (caching, training): the cached VLM vectors and head probabilities, then `train_gate`."""
    clock = Stopwatch(model.device)
    clock.start()
    vlm_scores, head_probs = cache_gate_inputs(model, data.batches)
    cached = clock.stop()
    gate = copy.deepcopy(model.gate).float().requires_grad_(True)
    return cached, _timed_training(heads.train_gate, "gate_args", model, cfg, gate,
                                   (vlm_scores, head_probs, data.labels.cpu()))


def _timed_training(train, group, model, cfg, module, tensors):
    """Seconds of `train(cfg.<group>, module, *tensors, output_dir, seed=cfg.seed)` (`group`: the stage's settings,
    `distill_args` or `gate_args`), after an untimed one-epoch call on two rows: the
    imports and one-time set-up of the Trainer stack, paid once per process, stay out of the timing (the reference
    is warm too: the inference timings ran its encoder and generation)."""
    overrides = _trainer_overrides(model.device)
    clock = Stopwatch(model.device)
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-bench-") as tmp:
        warm_up = stage_config(model, 1, 1, cfg.seed)
        train(getattr(warm_up, group), copy.deepcopy(module), *(t[:2] for t in tensors), tmp, seed=warm_up.seed,
              **overrides)
        clock.start()
        train(getattr(cfg, group), module, *tensors, tmp, seed=cfg.seed, **overrides)
        return clock.stop()


# ----------------------------------------------------------------------------------------------------------------
# Both, and their report
# ----------------------------------------------------------------------------------------------------------------


def distill_stage(model, reference, cfg, data):
    """(report entry, speedup) of the distillation stage: ours vs the reference over every epoch."""
    load = OtherLoad()
    cached, trained = ours_distill(model, cfg, data)
    head = copy.deepcopy(model.distill_head)
    clock = Stopwatch(model.device)
    clock.start()
    train_head_per_image(reference, head, data.singles, data.teacher_logits, data.labels, int(cfg.distill_epochs),
                         cfg.alpha, cfg.tau)
    reference_s = clock.stop()
    epochs = int(cfg.distill_epochs)
    entry = _stage_entry(data, epochs, cached, trained, reference_s, epochs, load.sample(), "train_head")
    return entry, reference_s / (cached + trained)


def gate_stage(model, reference, cfg, data, reference_epochs, seed=0):
    """(report entry, speedup) of the gate stage: ours vs the reference measured over `reference_epochs` epochs and
    scaled to all (each epoch does the same work)."""
    load = OtherLoad()
    cached, trained = ours_gate(model, cfg, data)
    gate = copy.deepcopy(model.gate)
    torch.manual_seed(seed)
    clock = Stopwatch(model.device)
    clock.start()
    train_gate_per_image(reference, gate, data.singles, data.labels, data.new_tokens, reference_epochs,
                         model.distill_head.classifier.weight.dtype)
    measured = clock.stop()
    epochs = int(cfg.gate_epochs)
    reference_s = measured * epochs / reference_epochs
    entry = _stage_entry(data, epochs, cached, trained, reference_s, reference_epochs, load.sample(), "train_gate")
    entry["reference_measured_s"] = round(measured, 3)
    entry["reference_extrapolated"] = reference_epochs < epochs
    return entry, reference_s / (cached + trained)


def _stage_entry(data, epochs, cached, trained, reference_s, reference_epochs, other_load, function):
    return {
        "images": len(data.singles),
        "epochs": epochs,
        "ours_s": round(cached + trained, 3),
        "ours_cache_s": round(cached, 3),
        "ours_train_s": round(trained, 3),
        "ours_trains_with": f"emovlm_kd.training.heads.{function} (HF Trainer)",
        "reference_s": round(reference_s, 3),
        "reference_epochs_measured": reference_epochs,
        "ours_batch_size": data.batch_size,
        "minibatch": STAGE_MINIBATCH,
        "other_load": None if other_load is None else round(other_load, 3),
    }


def time_stages(model, processor, reference, args):
    """{"distill_stage", "gate_stage", "distill_stage_speedup", "gate_stage_speedup"} for the report."""
    logger.info("timing the stages on %d images", args.stage_images)
    data = stage_data(model, processor, args.stage_images, args.image_size, max(args.sizes), args.seed)
    cfg = stage_config(model, args.distill_epochs, args.gate_epochs, args.seed)
    distill, distill_speedup = distill_stage(model, reference, cfg, data)
    logger.info("distillation stage done; gate stage (the reference regenerates answers every epoch)")
    gate, gate_speedup = gate_stage(model, reference, cfg, data, args.reference_gate_epochs, args.seed)
    return {
        "distill_stage": distill,
        "gate_stage": gate,
        "distill_stage_speedup": round(distill_speedup, 3),
        "gate_stage_speedup": round(gate_speedup, 3),
    }


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 (--train): QLoRA steps per second and peak memory
# ----------------------------------------------------------------------------------------------------------------


def time_stage1(args, device, dtype):
    """Stage 1's training step as `emovlm_kd.training.sft.run_stage1` sets it up (the base loaded from safetensors
    with `sft.quantization_config`: 4-bit nf4 double quantisation on CUDA; LoRA from TRL's `get_peft_config` of
    `sft.model_config` on the LLM's q, k, v; gradient checkpointing with 4-bit; TRL's `SFTTrainer` on prompt /
    completion rows), on a random model: `7b` at 7B widths with `TRAIN_7B_DEPTH` (4 text layers, 4 vision blocks),
    labelled as such.
    `--train-warmup-steps` untimed steps, then `--train-steps` timed ones; the peak memory is that of the whole
    `train()` call (`MemoryMeter`). The report entry, JSON-ready."""
    from emovlm_kd.training import sft

    quiet_libraries()  # no weight-loading bars or expected deprecation warnings in the output
    depth = TRAIN_7B_DEPTH if args.config == "7b" else None
    cfg = TrainConfig(quantize="4bit" if device.type == "cuda" else "none", seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-bench-sft-") as tmp:
        base, label, params = _save_random_base(args, device, dtype, depth, tmp)
        trainer, clock = _stage1_trainer(args, cfg, base, device, dtype, tmp)
        route_trainer_logs(trainer)  # the Trainer's metric dicts stay off stdout (the table is the output)
        memory = MemoryMeter(device).measure(trainer.train)
        vlm = trainer.model
        quant = sft.quantization_config(sft.model_config(cfg), cfg.quantize_scope)
        entry = _stage1_entry(args, cfg, clock, memory, label, quant, depth)
        entry.update(params=params, trainable_params=sum(p.numel() for p in vlm.parameters() if p.requires_grad))
        del trainer, vlm
    return entry


def _save_random_base(args, device, dtype, depth, folder):
    """(folder, label, parameters): the random backbone of `args.config` (at `depth`) saved as a Qwen2-VL checkpoint with its
    processor, built directly on `device` in `dtype` for the presets that say so (7b)."""
    direct = CONFIGS[args.config]["device"] is not None
    model, processor = build_random_model(args.config, seed=args.seed, image_size=args.image_size,
                                          device=device if direct else None, dtype=dtype if direct else None,
                                          depth=depth, backbone=args.backbone)
    path = f"{folder}/base"
    model.vlm.to(dtype).save_pretrained(path)
    processor.save_pretrained(path)
    text, vision = model.vlm.config.text_config, model.vlm.config.vision_config
    params = count_params(model.vlm)
    vision_width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL's name, the others'
    label = (f"random {args.config} {args.backbone}: hidden {text.hidden_size}, MLP {text.intermediate_size}, "
             f"vocabulary {text.vocab_size}, vision width {vision_width}; {text.num_hidden_layers} text layers, "
             f"{vision.depth} vision blocks; {params:,} parameters")
    if depth:
        full = preset_widths(args.config, args.backbone)
        label += (f" (reduced depth: {REAL_SIZES[args.backbone][0].split('/')[-1]} has {full['num_layers']} text "
                  f"layers and {full['vision_depth']} vision blocks)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path, label, params


class _StepClock(TrainerCallback):
    """The time at the start of training and at the end of every step (device synced)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def on_train_begin(self, *args, **kwargs):
        sync(self.device)
        self.times = [time.perf_counter()]

    def on_step_end(self, *args, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter())


def _stage1_trainer(args, cfg, base, device, dtype, folder):
    """(SFTTrainer, its _StepClock): stage 1's settings for `warmup + steps` optimizer steps on random images."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer, get_peft_config

    from emovlm_kd.training import sft

    quant = sft.quantization_config(sft.model_config(cfg), cfg.quantize_scope)
    vlm = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, quantization_config=quant,
                                                      use_safetensors=True)
    processor = AutoProcessor.from_pretrained(base)
    steps = args.train_warmup_steps + args.train_steps
    config = SFTConfig(
        output_dir=f"{folder}/out", max_steps=steps, per_device_train_batch_size=args.train_batch_size,
        learning_rate=cfg.sft_lr, lr_scheduler_type="constant", max_grad_norm=0.3, max_length=None,
        bf16=dtype == torch.bfloat16, gradient_checkpointing=quant is not None, use_cpu=device.type != "cuda",
        report_to=[], seed=args.seed, data_seed=args.seed, dataloader_num_workers=0, **QUIET,
    )
    clock = _StepClock(device)
    trainer = SFTTrainer(model=vlm, args=config, processing_class=processor,
                         peft_config=get_peft_config(sft.model_config(cfg)),
                         train_dataset=_stage1_rows(steps * args.train_batch_size, args.image_size, args.seed),
                         callbacks=[clock])
    return trainer, clock


def _stage1_rows(count, side, seed):
    """`count` prompt / completion rows (TRL's vision format) over random images: the FI instruction, a label's
    answer."""
    from datasets import Dataset

    from configuration_emovlm_kd import EmoVLMKDConfig
    from emovlm_kd.labels import MIKELS8

    config = EmoVLMKDConfig(id2label=dict(enumerate(MIKELS8)), label2id={x: i for i, x in enumerate(MIKELS8)})
    question = config.classification_prompt()
    answers = [config.answer_for(MIKELS8[i % len(MIKELS8)]) for i in range(count)]
    return Dataset.from_dict({
        "images": [[image] for image in random_images(count, side, seed=seed + 2)],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]] * count,
        "completion": [[{"role": "assistant", "content": [{"type": "text", "text": a}]}] for a in answers],
    })


def _stage1_entry(args, cfg, clock, memory, label, quant, depth):
    timed = clock.times[args.train_warmup_steps :]
    measured = len(timed) - 1
    seconds = (timed[-1] - timed[0]) / measured if measured > 0 else None
    full_layers = preset_widths(args.config, args.backbone).get("num_layers")
    scale = full_layers / depth["num_layers"] if depth else None
    return {
        "label": label,
        "quantization": "4-bit nf4, double quantisation (QLoRA)" if quant is not None else "none (LoRA)",
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": cfg.lora_targets},
        "batch_size": args.train_batch_size,
        "image_size": [args.image_size, args.image_size],
        "image_tokens": (args.image_size // (16 * 2 if args.backbone == "qwen3_vl" else 14 * 2)) ** 2,
        "warmup_steps": args.train_warmup_steps,
        "steps_measured": measured,
        "s_per_step": None if seconds is None else round(seconds, 4),
        "steps_per_s": None if not seconds else round(1.0 / seconds, 3),
        "s_per_step_scaled_to_full_depth": None if seconds is None or scale is None else round(seconds * scale, 3),
        "scaling": None if scale is None else (
            f"measured x {full_layers}/{depth['num_layers']} text layers: linear in depth, the embedding, LM head "
            "and vision blocks scaled alike (a rough estimate, not a measurement)"),
        "memory": memory,
    }
