"""Stage 2: the teacher (any `AutoModelForImageClassification`) fine-tuned with the HF `Trainer`, with seeded
augmentation, by the official train_ViT.py's recipe where the settings say so (Adam with L2 weight decay on every
parameter, constant learning rate); and its logits per image, computed once.

Evaluation keeps the aspect ratio, as the official code's test transform: the short side resized to the teacher's
input size, then the centre crop (not a squashing resize to a square). The fine-tuned teacher is saved with an image
processor that does exactly this, so `emovlm-kd evaluate --teacher RUN/stage2_teacher/model` and the training's
teacher pass see the same pixels; a `--teacher-trained` model is evaluated with its own image processor.
"""

import dataclasses
import logging

import torch
from transformers import set_seed

from emovlm_kd.errors import InputError
from emovlm_kd.images import prepare_image
from emovlm_kd.training.cache import (
    fingerprint,
    fingerprint_checkpoint,
    fingerprint_dataset,
    fingerprint_module,
)
from emovlm_kd.training.passes import cached_map
from emovlm_kd.training.stage import adam, last_checkpoint, run_stage, run_trainer, trained

logger = logging.getLogger(__name__)


def input_side(image_processor):
    """The square input side of a teacher's image processor (its crop size where it crops)."""
    size = (image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None) or \
        image_processor.size
    return size.get("height") or size.get("shortest_edge") or 224


def train_transform(image_processor):
    """The official code's augmentation for training: RandomResizedCrop + horizontal flip, then normalisation."""
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(input_side(image_processor)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(image_processor.image_mean, image_processor.image_std)])


def eval_image_processor(image_processor):
    """An image processor for evaluation that keeps the aspect ratio (the official code's Resize(side) then
    CenterCrop(side), bilinear), with the base processor's normalisation: `BitImageProcessor`, shortest-edge resize
    and centre crop."""
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    side = input_side(image_processor)
    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": side}, resample=PILImageResampling.BILINEAR, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std), do_convert_rgb=True,
    )


def teacher_trainer(settings, teacher, train, output_dir, *, seed, callbacks=()):
    """The HF `Trainer` of stage 2 with the teacher recipe of `settings` (a `TeacherArguments`: optimizer, weight
    decay, schedule, epochs, lr, batch), resuming with every weight verified."""
    from emovlm_kd.training.arguments import training_arguments
    from emovlm_kd.training.trainers import VerifiedTrainer

    args = training_arguments(settings, output_dir, seed)
    # adam: torch.optim.Adam with L2 weight decay on every parameter, as the official train_ViT.py; adamw:
    # transformers' default optimizer, with no decay on biases and norms
    optimizer = adam(settings.teacher_optimizer, teacher, settings.teacher_lr, settings.teacher_weight_decay)
    return VerifiedTrainer(model=teacher, args=args, train_dataset=train, callbacks=list(callbacks),
                           optimizer_cls_and_kwargs=optimizer)


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


def load_teacher_with_new_classifier(auto_class, teacher_path, names):
    """The base teacher with a new classifier for `names`: the expected re-initialisation is one log line (not
    transformers' load-report table); any other missing or unexpected weight is a warning naming it."""
    import logging as std_logging

    report_logger = std_logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(std_logging.ERROR)
    try:
        teacher, info = auto_class.from_pretrained(
            teacher_path, use_safetensors=True, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        report_logger.setLevel(level)
    head = teacher.base_model_prefix
    new = sorted({key for key, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", [])))
    other = [key for key in new if key.startswith(head)] + list(info.get("unexpected_keys", []))
    if other:
        logger.warning("[stage 2] teacher %s: weights not loaded as they are: %s", teacher_path, ", ".join(other))
    logger.info("[stage 2] teacher %s with a new classifier for %d labels (%s)", teacher_path, len(names),
                ", ".join(key for key in new if not key.startswith(head)) or "none")
    return teacher


def run_stage2(settings, run_dir, dataset, teacher_path, *, seed):
    """Fine-tune the teacher (any AutoModelForImageClassification) with the HF Trainer, by the stage's
    `TeacherArguments` (`settings`)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    names = dataset["train"].features["label"].names
    key = fingerprint(settings.stage, dataclasses.asdict(settings), fingerprint_checkpoint(teacher_path),
                      fingerprint_dataset(dataset["train"]), names, seed)

    def work(stage):
        image_processor = AutoImageProcessor.from_pretrained(teacher_path)
        set_seed(seed)  # the new classifier layer is initialised from the global generator
        teacher = load_teacher_with_new_classifier(AutoModelForImageClassification, teacher_path, names)
        augment = SeededAugmentation(train_transform(image_processor), seed)
        train = dataset["train"].add_column("row", list(range(len(dataset["train"])))).with_transform(augment)
        trainer = teacher_trainer(settings, teacher, train, stage.checkpoints(), seed=seed,
                                  callbacks=[augment.callback()])
        result = run_trainer(trainer, last_checkpoint(trainer.args.output_dir))

        def write(folder):
            trainer.save_model(str(folder))
            eval_image_processor(image_processor).save_pretrained(str(folder))

        return write, trained(result)

    return run_stage(run_dir, "stage2_teacher", key, "model", work, skipped="[stage 2] teacher: done, skipped",
                     log=logger, folder=True)


def check_teacher_labels(teacher_path, names):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_path)
    teacher_names = [config.id2label[i].lower() for i in range(len(config.id2label))]
    if teacher_names != list(names):
        raise InputError(f"teacher {teacher_path} has labels {teacher_names}, the dataset has {list(names)}")


def teacher_cache(cache, teacher, image_processor, split, split_name, *, batch_size):
    """Teacher logits per image, computed once, with the teacher's own image processor (as `emovlm-kd evaluate`)."""
    key = fingerprint("teacher", fingerprint_module(teacher), fingerprint_dataset(split), image_processor.to_dict())
    param = next(teacher.parameters())

    @torch.inference_mode()
    def compute_batch(indices):
        images = [prepare_image(split[i]["image"]) for i in indices]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
        return {"teacher_logits": teacher(pixel_values=pixels).logits.float().cpu()}

    return cached_map(cache, f"teacher-{split_name}", key, len(split), batch_size, compute_batch,
                      desc=f"teacher ({split_name})")
