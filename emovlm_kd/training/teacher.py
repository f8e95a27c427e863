"""Stage 2: the teacher (any `AutoModelForImageClassification`) fine-tuned with the HF `Trainer`, with seeded
augmentation; and its logits per image, computed once."""

import logging
import shutil
from pathlib import Path

import torch
from transformers import set_seed

from emovlm_kd.distributed import is_main_process
from emovlm_kd.images import prepare_image
from emovlm_kd.training.cache import (
    fingerprint,
    fingerprint_checkpoint,
    fingerprint_dataset,
    fingerprint_module,
)
from emovlm_kd.training.passes import cached_map
from emovlm_kd.training.stage import Stage, last_checkpoint, trainer_args

logger = logging.getLogger(__name__)


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
                pixels.append(self.transform(prepare_image(image)))
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
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        Trainer,
    )

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


def teacher_cache(cfg, cache, teacher, image_processor, split, split_name):
    """Teacher logits per image, computed once."""
    key = fingerprint("teacher", fingerprint_module(teacher), fingerprint_dataset(split))
    transform = teacher_transforms(image_processor, train=False)
    device = next(teacher.parameters()).device

    @torch.inference_mode()
    def compute_batch(indices):
        pixels = torch.stack([transform(prepare_image(split[i]["image"])) for i in indices]).to(device)
        return {"teacher_logits": teacher(pixel_values=pixels).logits.float().cpu()}

    return cached_map(cache, f"teacher-{split_name}", key, len(split), cfg.batch_size, compute_batch,
                      desc=f"teacher ({split_name})")
