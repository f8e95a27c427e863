"""The training stages. Each writes its output under RUN/, then a `DONE.json` holding the fingerprint of its
inputs; a rerun skips a stage whose DONE.json matches and resumes a stage's Trainer from its last checkpoint.

    stage0_instructions/  instructions.jsonl      categorical (+ conversation / reasoning) instructions
    stage1_sft/           merged/                 Qwen2-VL with the LoRA adapter merged (TRL SFTTrainer)
    stage2_teacher/       model/                  the fine-tuned teacher (HF Trainer)
    stage3_distill/       head.safetensors        the distillation head (DistillationTrainer, cached features)
    stage4_gate/          gate.safetensors        the gate (GateTrainer, cached VLM vectors and head outputs)
    model/                                        the Hub model; eval_results.json beside it
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import set_seed

from emovlm_kd.training.cache import (
    atomic_write_text,
    fingerprint,
    fingerprint_checkpoint,
    fingerprint_dataset,
    fingerprint_module,
)
from emovlm_kd.distributed import barrier, is_main_process, main_process_decides, map_sharded, world_size

logger = logging.getLogger(__name__)

CONVERSATION_QUESTION = "Observe the image and describe key elements of the image."
REASONING_QUESTION = "Observe the image and describe the process of inferring the emotions conveyed in the image."


# ----------------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------------------------


class Stage:
    """A stage folder with a DONE.json marker that records the fingerprint of the stage's inputs."""

    def __init__(self, run_dir, name, key):
        self.dir = Path(run_dir) / name
        self.name, self.key = name, key

    @property
    def done(self):
        """Finished with these inputs? Decided by the main process, so all processes skip or run together."""
        marker = self.dir / "DONE.json"
        return main_process_decides(lambda: marker.exists() and json.loads(marker.read_text()).get("key") == self.key)

    def checkpoints(self):
        """The Trainer's checkpoint folder for this key; checkpoints of other settings are removed (never resumed)."""
        folder = self.dir / f"checkpoints-{self.key}"
        if is_main_process() and self.dir.is_dir():
            for stale in self.dir.glob("checkpoints-*"):
                if stale != folder:
                    logger.info("[%s] removing checkpoints of other settings: %s", self.name, stale.name)
                    shutil.rmtree(stale, ignore_errors=True)
        barrier()
        return folder

    def finish(self, **summary):
        if is_main_process():
            atomic_write_text(self.dir / "DONE.json", json.dumps({"key": self.key, **summary}, indent=2))
        barrier()
        logger.info("[%s] done: %s", self.name, ", ".join(f"{k}={v}" for k, v in summary.items()))


def last_checkpoint(folder):
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(folder)
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def resolve_dtype(cfg):
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def trainer_args(cfg, output_dir, epochs, lr, batch_size, **extra):
    """TrainingArguments shared by the stages (seeded, checkpoint every epoch, keep one); `extra` overrides."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        save_strategy="epoch",
        save_total_limit=1,
        logging_strategy="epoch",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # one global batch split across processes: the same updates under torchrun as in one process
        accelerator_config={"split_batches": True},
    )
    values.update(extra)
    return TrainingArguments(**values)


def rgb(image):
    from emovlm_kd.images import model_image

    return model_image(image)


# ----------------------------------------------------------------------------------------------------------------
# Stage 0: instruction data
# ----------------------------------------------------------------------------------------------------------------


def categorical_instruction(config):
    """The paper's categorical instruction for the labels of `config` (an EmoVLMKDConfig)."""
    return config.classification_prompt()


def read_instruction_jsonl(path, known_ids):
    """Conversation / reasoning answers from a user JSONL: {"id" (or "path"), "kind", "answer"[, "question"]}."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            image_id = row.get("id", row.get("path"))
            kind = row.get("kind")
            if kind not in ("conversation", "reasoning") or not row.get("answer"):
                raise ValueError(f"{path}:{number}: need kind conversation/reasoning and a non-empty answer")
            if image_id not in known_ids:
                logger.warning("%s:%d: image %r is not in the train split; ignored", path, number, image_id)
                continue
            question = row.get("question") or (CONVERSATION_QUESTION if kind == "conversation" else REASONING_QUESTION)
            rows.append({"id": image_id, "kind": kind, "question": question, "answer": row["answer"]})
    return rows


def run_stage0(cfg, run_dir, dataset, bundle_config):
    """instructions.jsonl: categorical rows for every train image plus conversation/reasoning rows."""
    from emovlm_kd.training.annotate import annotate_split

    train = dataset["train"]
    key = fingerprint("stage0", fingerprint_dataset(train), bundle_config.classification_prompt(),
                      bundle_config.answer_template, cfg.instructions, cfg.annotator, cfg.annotator_model)
    stage = Stage(run_dir, "stage0_instructions", key)
    out = stage.dir / "instructions.jsonl"
    if stage.done:
        logger.info("[stage 0] instruction data: done, skipped")
        return out
    question = categorical_instruction(bundle_config)
    names = train.features["label"].names
    rows = [
        {"id": image_id, "kind": "categorical", "question": question, "answer": bundle_config.answer_for(names[label])}
        for image_id, label in zip(train["id"], train["label"])
    ]
    if cfg.instructions:
        rows += read_instruction_jsonl(cfg.instructions, set(train["id"]))
    if cfg.annotator and is_main_process():
        rows += annotate_split(cfg, train, stage.dir / "annotations.jsonl", [CONVERSATION_QUESTION, REASONING_QUESTION])
    if is_main_process():
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("categorical", "conversation", "reasoning")}
    stage.finish(rows=len(rows), **kinds)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: instruction tuning (TRL SFTTrainer + LoRA / QLoRA), merged into the backbone
# ----------------------------------------------------------------------------------------------------------------


def sft_dataset(train, instructions_path):
    """TRL's vision prompt/completion format: `images`, `prompt` and `completion` (loss on the completion only)."""
    from datasets import Dataset, Image, Sequence

    raw_images = dict(zip(train["id"], train.cast_column("image", Image(decode=False))["image"]))
    rows = [json.loads(line) for line in Path(instructions_path).read_text(encoding="utf-8").splitlines() if line]
    data = Dataset.from_dict(
        {
            "images": [[raw_images[r["id"]]] for r in rows],
            "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
                       for r in rows],
            "completion": [[{"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]}] for r in rows],
        }
    )
    return data.cast_column("images", Sequence(Image()))


def quantization_config(cfg):
    """4-bit nf4 double-quant (QLoRA) when asked, or by default when CUDA is present."""
    use_4bit = cfg.quantize == "4bit" or (cfg.quantize == "auto" and torch.cuda.is_available())
    if not use_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["model.visual", "lm_head"],
    )


def lora_config(cfg):
    from peft import LoraConfig

    targets = "|".join(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=rf".*language_model.*\.({targets})",  # the LLM's projections, not the vision tower's
        task_type="CAUSAL_LM",
    )


def run_stage1(cfg, run_dir, dataset, vlm_path, instructions_path):
    """Instruction-tune the VLM with LoRA (QLoRA on CUDA), merge the adapter, save RUN/stage1_sft/merged."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    key = fingerprint("stage1", fingerprint_checkpoint(vlm_path), Path(instructions_path).read_text(encoding="utf-8"),
                      cfg.sft_epochs, cfg.sft_lr, cfg.sft_batch_size, cfg.sft_grad_accum, cfg.lora_r, cfg.lora_alpha,
                      cfg.lora_dropout, cfg.lora_targets, cfg.quantize, cfg.dtype, cfg.seed)
    stage = Stage(run_dir, "stage1_sft", key)
    merged_dir = stage.dir / "merged"
    if stage.done:
        logger.info("[stage 1] instruction tuning: done, skipped")
        return merged_dir
    dtype = resolve_dtype(cfg)
    quant = quantization_config(cfg)
    if quant is not None:
        logger.info("[stage 1] QLoRA: loading %s in 4-bit nf4 with double quantisation", vlm_path)
    set_seed(cfg.seed)  # LoRA's initialisation draws from the global generator: same start in every process
    processor = AutoProcessor.from_pretrained(vlm_path)
    vlm = AutoModelForImageTextToText.from_pretrained(
        vlm_path, dtype=dtype, quantization_config=quant, use_safetensors=True
    )
    args = SFTConfig(
        output_dir=str(stage.checkpoints()),
        num_train_epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.03,  # a ratio of the total steps, as the official code's 3%
        max_grad_norm=0.3,
        per_device_train_batch_size=cfg.sft_batch_size,
        gradient_accumulation_steps=cfg.sft_grad_accum,
        max_length=None,
        save_strategy="epoch",
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=10,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=quant is not None,
        accelerator_config={"split_batches": world_size() > 1 and cfg.sft_batch_size % world_size() == 0},
    )
    trainer = SFTTrainer(
        model=vlm,
        args=args,
        train_dataset=sft_dataset(dataset["train"], instructions_path),
        processing_class=processor,
        peft_config=lora_config(cfg),
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
    adapter_dir = stage.dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if is_main_process():
        if quant is not None:  # merge into an unquantised copy of the base weights
            base = AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=dtype, use_safetensors=True)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        else:
            merged = trainer.model.merge_and_unload()
        tmp = merged_dir.with_name("merged.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        shutil.rmtree(merged_dir, ignore_errors=True)
        tmp.rename(merged_dir)
    del trainer, vlm
    stage.finish(train_loss=round(result.training_loss, 4), steps=result.global_step)
    return merged_dir


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: teacher
# ----------------------------------------------------------------------------------------------------------------


def teacher_transforms(image_processor, train):
    """The official code's augmentation for training (RandomResizedCrop + horizontal flip), plain resize for eval."""
    from torchvision import transforms

    size = image_processor.size
    side = size.get("shortest_edge") or size.get("height") or 224
    mean, std = image_processor.image_mean, image_processor.image_std
    steps = (
        [transforms.RandomResizedCrop(side), transforms.RandomHorizontalFlip()]
        if train
        else [transforms.Resize((side, side))]
    )
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


class SeededAugmentation:
    """Random augmentation drawn from (seed, epoch, row): the same crops whatever the number of processes, and
    the same after resuming from a checkpoint, as in an uninterrupted run."""

    def __init__(self, transform, seed):
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __call__(self, batch):
        pixels = []
        for image, row in zip(batch["image"], batch["row"]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + row) % (2**63))
                pixels.append(self.transform(rgb(image)))
        return {"pixel_values": pixels, "labels": batch["label"]}

    def callback(self):
        from transformers import TrainerCallback

        augmentation = self

        class EpochCallback(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                augmentation.epoch = int((state.epoch or 0) + 1e-6)  # resumed mid-epoch: that epoch

        return EpochCallback()


def run_stage2(cfg, run_dir, dataset, teacher_path):
    """Fine-tune the teacher (any AutoModelForImageClassification) with the HF Trainer."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer

    names = dataset["train"].features["label"].names
    if cfg.teacher_trained:
        check_teacher_labels(cfg.teacher_trained, names)
        return Path(cfg.teacher_trained)
    key = fingerprint("stage2", fingerprint_checkpoint(teacher_path), fingerprint_dataset(dataset["train"]), names, cfg.teacher_epochs,
                      cfg.teacher_lr, cfg.teacher_batch_size, cfg.seed)
    stage = Stage(run_dir, "stage2_teacher", key)
    model_dir = stage.dir / "model"
    if stage.done:
        logger.info("[stage 2] teacher: done, skipped")
        return model_dir
    image_processor = AutoImageProcessor.from_pretrained(teacher_path)
    set_seed(cfg.seed)  # the new classifier layer is initialised from the global generator
    teacher = AutoModelForImageClassification.from_pretrained(
        teacher_path,
        use_safetensors=True,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    augment = SeededAugmentation(teacher_transforms(image_processor, train=True), cfg.seed)
    train = dataset["train"].add_column("row", list(range(len(dataset["train"])))).with_transform(augment)
    args = trainer_args(cfg, stage.checkpoints(), cfg.teacher_epochs, cfg.teacher_lr, cfg.teacher_batch_size,
                        weight_decay=1e-4)
    trainer = Trainer(model=teacher, args=args, train_dataset=train, callbacks=[augment.callback()])
    result = trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
    if is_main_process():
        tmp = model_dir.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        image_processor.save_pretrained(str(tmp))
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    stage.finish(train_loss=round(result.training_loss, 4), steps=result.global_step)
    return model_dir


def check_teacher_labels(teacher_path, names):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_path)
    teacher_names = [config.id2label[i].lower() for i in range(len(config.id2label))]
    if teacher_names != list(names):
        raise ValueError(f"teacher {teacher_path} has labels {teacher_names}, the dataset has {list(names)}")


# ----------------------------------------------------------------------------------------------------------------
# Cached frozen outputs
# ----------------------------------------------------------------------------------------------------------------


def vlm_pass_cache(cfg, cache, model, processor, split, split_name):
    """One batched pass per image through the frozen bundle: pooled visual features + label log-likelihoods."""
    from emovlm_kd.inference import run_batch

    key = fingerprint("vlm_pass", fingerprint_module(model.vlm), fingerprint_dataset(split),
                      model.config.classification_prompt(), model.config.label_answer_token_ids)

    def compute_batch(indices):
        output = run_batch(model, processor, [rgb(split[i]["image"]) for i in indices], vlm_mode="score")
        return {"image_embeds": output.image_embeds, "vlm_log_likelihoods": output.vlm_log_likelihoods}

    return cached_map(cache, f"vlm_pass-{split_name}", key, len(split), cfg.batch_size, compute_batch,
                      desc=f"VLM pass ({split_name})")


def teacher_cache(cfg, cache, teacher, image_processor, split, split_name):
    """Teacher logits per image, computed once."""
    key = fingerprint("teacher", fingerprint_module(teacher), fingerprint_dataset(split))
    transform = teacher_transforms(image_processor, train=False)
    device = next(teacher.parameters()).device

    @torch.inference_mode()
    def compute_batch(indices):
        pixels = torch.stack([transform(rgb(split[i]["image"])) for i in indices]).to(device)
        return {"teacher_logits": teacher(pixel_values=pixels).logits.float().cpu()}

    return cached_map(cache, f"teacher-{split_name}", key, len(split), cfg.batch_size, compute_batch,
                      desc=f"teacher ({split_name})")


def cached_map(cache, name, key, length, batch_size, compute_batch, desc):
    """`compute_batch` over all rows (sharded across processes), concatenated, cached under name+key."""
    if main_process_decides(lambda: cache.path(name, key).exists()):
        return cache.get(name, key)
    tensors = map_sharded(compute_batch, length, batch_size, desc=desc)  # every process gets all rows
    if is_main_process():
        cache.put(name, key, tensors)
    barrier()
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Stages 3 and 4: head and gate on cached tensors
# ----------------------------------------------------------------------------------------------------------------


def run_stage3(cfg, run_dir, bundle, features, teacher_logits, labels):
    """Distil the teacher into the head (only the head trains) on cached features and teacher logits."""
    key = fingerprint("stage3", [fingerprint_tensor(features), fingerprint_tensor(teacher_logits)],
                      cfg.head_hidden_sizes, cfg.head_dropout, cfg.alpha, cfg.tau, cfg.distill_epochs,
                      cfg.distill_lr, cfg.distill_batch_size, cfg.seed)
    stage = Stage(run_dir, "stage3_distill", key)
    head_file = stage.dir / "head.safetensors"
    if stage.done:
        bundle.distill_head.load_state_dict(load_file(head_file))
        logger.info("[stage 3] distillation: done, skipped")
        return head_file
    result = train_head(cfg, bundle.distill_head, features, teacher_logits, labels, stage.checkpoints(), resume=True)
    if is_main_process():
        save_module(bundle.distill_head, head_file)
    stage.finish(train_loss=round(result.training_loss, 4), steps=result.global_step)
    return head_file


def run_stage4(cfg, run_dir, bundle, vlm_scores, head_probs, labels):
    """Train the gate (only the gate) on cached VLM vectors and head probabilities."""
    key = fingerprint("stage4", [fingerprint_tensor(vlm_scores), fingerprint_tensor(head_probs)], cfg.gate_type,
                      cfg.vlm_vector, cfg.gate_epochs, cfg.gate_lr, cfg.gate_batch_size, cfg.gate_train_split, cfg.seed)
    stage = Stage(run_dir, "stage4_gate", key)
    gate_file = stage.dir / "gate.safetensors"
    if stage.done:
        bundle.gate.load_state_dict(load_file(gate_file))
        logger.info("[stage 4] gate: done, skipped")
        return gate_file
    result = train_gate(cfg, bundle.gate, vlm_scores, head_probs, labels, stage.checkpoints(), resume=True)
    if is_main_process():
        save_module(bundle.gate, gate_file)
    stage.finish(train_loss=round(result.training_loss, 4), steps=result.global_step)
    return gate_file


def train_head(cfg, head, features, teacher_logits, labels, output_dir, resume=False, **args_extra):
    """Re-initialise `head` from cfg.seed and distil into it (DistillationTrainer; cfg's alpha, tau, epochs, lr).

    No stage bookkeeping: stage 3 and the ablations share it. `resume` continues from the last checkpoint in
    `output_dir`; `args_extra` overrides TrainingArguments (the ablations save nothing and log nothing).
    """
    from emovlm_kd.training.trainers import DistillationTrainer, TensorDictDataset

    reset_module(head, cfg.seed)
    data = TensorDictDataset(image_embeds=features, teacher_logits=teacher_logits, labels=labels)
    args = trainer_args(cfg, output_dir, cfg.distill_epochs, cfg.distill_lr, cfg.distill_batch_size,
                        weight_decay=1e-4, **args_extra)
    trainer = DistillationTrainer(model=head, args=args, train_dataset=data, alpha=cfg.alpha, tau=cfg.tau)
    return _train(trainer, args, resume)


def train_gate(cfg, gate, vlm_scores, head_probs, labels, output_dir, resume=False, **args_extra):
    """Re-initialise `gate` from cfg.seed and train it with cross-entropy (GateTrainer; cfg's gate epochs, lr)."""
    from emovlm_kd.training.trainers import GateModule, GateTrainer, TensorDictDataset

    reset_module(gate, cfg.seed)
    data = TensorDictDataset(vlm_scores=vlm_scores, head_probs=head_probs, labels=labels)
    args = trainer_args(cfg, output_dir, cfg.gate_epochs, cfg.gate_lr, cfg.gate_batch_size, weight_decay=1e-4,
                        **args_extra)
    trainer = GateTrainer(model=GateModule(gate), args=args, train_dataset=data)
    return _train(trainer, args, resume)


def _train(trainer, args, resume):
    if args.disable_tqdm:  # quiet: no per-epoch log lines either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if resume else None)


def vlm_vectors(log_likelihoods, mode):
    """What the gate sees from the VLM branch: the label distribution, or its argmax one-hot (paper)."""
    probs = log_likelihoods.float().softmax(-1)
    if mode == "onehot":
        return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()
    return probs


@torch.inference_mode()
def head_outputs(head, features, batch_size=1024):
    """Head logits (float32, on the CPU) for cached features, in the head's dtype and on its device."""
    head.eval()
    param = next(head.parameters())
    return torch.cat([head(features[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
                      for i in range(0, len(features), batch_size)])


@torch.inference_mode()
def gate_outputs(gate, vlm_scores, head_probs):
    """Gate logits (float32, on the CPU) for cached VLM vectors and head probabilities."""
    gate.eval()
    param = next(gate.parameters())
    return gate(vlm_scores.to(param.device, param.dtype), head_probs.to(param.device, param.dtype)).float().cpu()


def reset_module(module, seed):
    """Re-initialise a small module deterministically (so a rerun trains from the same start)."""
    torch.manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Bilinear)):
            torch.nn.init.normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)


def save_module(module, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
    tmp.replace(path)


def fingerprint_tensor(tensor):
    import hashlib

    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


