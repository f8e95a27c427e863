"""Stage 2, the teacher: the official train_ViT.py's recipe (Adam, lr 3e-5, weight decay 1e-5, batch 10, 10 epochs,
constant lr) in the paper configs, and an evaluation transform that keeps the aspect ratio (resize the short side,
then the centre crop, as the official code's test transform)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_settings
from PIL import Image

from emovlm_kd.training import teacher as stage2
from emovlm_kd.training.config import TrainConfig, load_config

OFFICIAL = {"teacher_optimizer": "adam", "teacher_lr": 3e-5, "teacher_weight_decay": 1e-5, "teacher_batch_size": 10,
            "teacher_epochs": 10.0, "teacher_scheduler": "constant"}


def test_the_paper_configs_and_the_defaults_hold_the_official_recipe():
    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    for cfg in [TrainConfig(), *(load_config(str(root / f"{n}.yaml"))
                                 for n in ("fi", "emoset", "emotion6", "flickr", "instagram"))]:
        assert {k: getattr(cfg, k) for k in OFFICIAL} == OFFICIAL


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from transformers import AutoModelForImageClassification

    from emovlm_kd.tiny import build_tiny_teacher

    folder = tmp_path_factory.mktemp("t") / "teacher"
    build_tiny_teacher(folder, seed=0)
    return AutoModelForImageClassification.from_pretrained(folder)


def optimizer_and_schedule(cfg, model, tmp_path, steps=6):
    trainer = stage2.teacher_trainer(cfg.teacher_args, model, train=None, output_dir=tmp_path, seed=cfg.seed)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return trainer.optimizer, rates


def test_adam_decays_every_parameter_at_a_constant_rate(tiny_teacher, tmp_path):
    optimizer, rates = optimizer_and_schedule(TrainConfig(), tiny_teacher, tmp_path)
    assert type(optimizer) is torch.optim.Adam  # not AdamW: L2 decay inside the gradient, as torch.optim.Adam
    decayed = [p for group in optimizer.param_groups if group["weight_decay"] == 1e-5 for p in group["params"]]
    assert len(decayed) == len(list(tiny_teacher.parameters()))  # biases and norms too, as the official code
    assert rates == [3e-5] * len(rates)


def test_adamw_with_a_linear_schedule_is_one_setting_away(tiny_teacher, tmp_path):
    cfg = TrainConfig(teacher_optimizer="adamw", teacher_scheduler="linear", teacher_weight_decay=1e-4)
    optimizer, rates = optimizer_and_schedule(cfg, tiny_teacher, tmp_path)
    assert type(optimizer) is torch.optim.AdamW
    assert {group["weight_decay"] for group in optimizer.param_groups} == {1e-4, 0.0}  # none on biases and norms
    assert rates[0] == pytest.approx(3e-5) and rates == sorted(rates, reverse=True) and rates[-1] < rates[0]
    with pytest.raises(ValueError, match="--teacher-optimizer"):
        TrainConfig(teacher_optimizer="sgd")


def banded(width, height, side_colour, middle_colour):
    """An image whose centre square is `middle_colour` and whose remaining sides are `side_colour`."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = side_colour
    short = min(width, height)
    left, top = (width - short) // 2, (height - short) // 2
    pixels[top : top + short, left : left + short] = middle_colour
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(144, 48), (48, 120)])
def test_evaluation_keeps_the_aspect_ratio(size):
    from transformers import ViTImageProcessor

    base = ViTImageProcessor(size={"height": 48, "width": 48})  # squashes to a square
    image = banded(*size, side_colour=(255, 0, 0), middle_colour=(0, 255, 0))
    square = Image.new("RGB", (48, 48), (0, 255, 0))
    kept = stage2.eval_image_processor(base)
    pixels = kept(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48)
    torch.testing.assert_close(pixels, kept(images=[square], return_tensors="pt")["pixel_values"], atol=0.05, rtol=0)
    squashed = base(images=[image], return_tensors="pt")["pixel_values"]
    assert (squashed[0, 0] > 0.5).float().mean() > 0.3  # the squashing resize keeps the red sides


def test_stage2_saves_the_teacher_with_its_evaluation_transform(tiny_inputs, tmp_path):
    from transformers import AutoImageProcessor

    from emovlm_kd.data import load_image_dataset

    data, vlm, teacher = tiny_inputs
    cfg = tiny_settings(data, vlm, teacher, tmp_path / "run", teacher_epochs=1.0)
    dataset = load_image_dataset(str(data))
    model_dir = stage2.run_stage2(cfg.teacher_args, tmp_path / "run", dataset, teacher, seed=cfg.seed)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    assert processor.do_center_crop and processor.size["shortest_edge"] == 48
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (48, 48)
    assert stage2.input_side(processor) == 48
