"""One image size (issue 11): every image's long side is limited to `config.max_image_side` (1024 by default, as the
official code) by `prepare_image`, the same way in SFT, the caches, `evaluate`, `predict` and the pipeline; the
processor's `max_pixels` is lowered to the same budget and saved with it."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from emovlm_kd.images import (
    MIN_SIDE,
    limit_processor_pixels,
    load_image_file,
    max_pixels_for_side,
    prepare_image,
)

SIDE = 56  # small enough to change what the tiny processor (at most 112 x 112 pixels) makes of a 120 x 100 image

SHAPES = [(20000, 1), (1, 20000), (1025, 10), (3, 900), (2000, 5), (4000, 3000), (3000, 4000), (1024, 1024),
          (1500, 1499), (60, 80), (10, 5), (1, 1)]


@pytest.mark.parametrize("width, height", SHAPES)
def test_prepared_images_never_exceed_the_long_side_and_the_processor_accepts_them(width, height):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = Image.new("RGB", (width, height), (200, 10, 10))
    for side in (1024, SIDE):
        out = prepare_image(image, max_side=side)
        assert max(out.size) <= side and min(out.size) >= MIN_SIDE, (side, out.size)
        smart_resize(out.size[1], out.size[0])  # raises on an aspect ratio the processor refuses
        if max(width, height) <= side and max(width, height) / min(width, height) <= side / MIN_SIDE:
            assert out.size == prepare_image(image).size  # within the limits: as without one
    assert prepare_image(Image.new("RGB", (4000, 3000)), max_side=1024).size == (1024, 768)  # aspect kept


def test_the_limit_applies_to_the_upright_image_after_exif_and_mode_handling(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    random_image(200, 120, seed=1).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgba = np.zeros((100, 300, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    rotated = load_image_file(tmp_path / "rotated.jpg", max_side=100)
    assert rotated.size == (60, 100) and rotated.mode == "RGB"
    assert np.asarray(prepare_image(str(tmp_path / "rotated.jpg"), max_side=100)).shape == (100, 60, 3)
    white = load_image_file(tmp_path / "transparent.png", max_side=150)
    assert white.size == (150, 50) and np.asarray(white).min() == 255  # transparency on white, then scaled


def test_the_processor_limit_is_the_budget_of_the_long_side_and_is_saved(tmp_path):
    from transformers import AutoProcessor

    from emovlm_kd.tiny import build_tiny_processor

    processor = build_tiny_processor(max_pixels=28 * 28 * 16384)  # Qwen2-VL's released limit: ~12.8 M pixels
    assert limit_processor_pixels(processor, 1024) == max_pixels_for_side(1024, processor.image_processor) == 1036**2
    processor.save_pretrained(tmp_path / "p")
    assert AutoProcessor.from_pretrained(tmp_path / "p").image_processor.size["longest_edge"] == 1036**2
    unlimited = build_tiny_processor(max_pixels=28 * 28 * 16384)
    for size in [(1024, 1024), (1024, 700), (333, 1024), (1024, 29)]:  # a prepared image: never changed by it
        image = random_image(*size, seed=0)
        grids = [p.image_processor(images=[image])["image_grid_thw"] for p in (processor, unlimited)]
        assert torch.equal(*grids), size
    big = random_image(3000, 2000, seed=0)  # a raw image handed to the processor directly: the same budget
    thw = processor.image_processor(images=[big])["image_grid_thw"][0]
    assert int(thw[1] * thw[2]) * 14 * 14 <= 1036**2
    tiny = build_tiny_processor()  # a lower limit is kept
    assert limit_processor_pixels(tiny, 1024) == 112 * 112 == tiny.image_processor.size["longest_edge"]


def test_config_and_training_setting():
    from configuration_emovlm_kd import EmoVLMKDConfig
    from emovlm_kd.training.config import TrainConfig, parse_train_args

    assert EmoVLMKDConfig().max_image_side == 1024 and TrainConfig().max_image_side == 1024
    assert EmoVLMKDConfig(max_image_side=None).max_image_side is None
    with pytest.raises(ValueError, match="max_image_side"):
        EmoVLMKDConfig(max_image_side=20)
    assert parse_train_args(["--max-image-side", "512"]).max_image_side == 512
    with pytest.raises(ValueError, match="--max-image-side"):
        TrainConfig(max_image_side=10)


# ---------------------------------------------------------------------------------------------------------------
# The same limit on every path: a bundle limited to SIDE pixels
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_side_bundle(tiny_bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("side") / "model"
    shutil.copytree(tiny_bundle_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_image_side"] = SIDE
    (folder / "config.json").write_text(json.dumps(config))
    from emovlm_kd.hub import load_bundle

    model, processor = load_bundle(folder)
    return folder, model, processor


def _grid(processor, image):
    return processor.image_processor(images=[image])["image_grid_thw"]


def test_pipeline_and_run_batch_use_the_models_limit(small_side_bundle):
    from transformers import pipeline

    from emovlm_kd.inference import run_batch

    folder, model, processor = small_side_bundle
    image = random_image(120, 100, seed=4)
    limited = prepare_image(image, max_side=SIDE)
    assert not torch.equal(_grid(processor, limited), _grid(processor, prepare_image(image)))  # the limit matters
    classify = pipeline(model=str(folder), trust_remote_code=True)
    inputs = classify.preprocess(image)
    assert torch.equal(inputs["image_grid_thw"], _grid(processor, limited))
    expected = run_batch(model, processor, [limited])
    by_label = {r["label"]: r["score"] for r in classify(image)}
    scores = torch.tensor([by_label[label] for label in model.config.labels])
    torch.testing.assert_close(scores, expected.logits[0].softmax(-1), atol=1e-5, rtol=1e-4)
    unlimited = run_batch(model, processor, [prepare_image(image)])  # a caller that forgot: limited all the same
    torch.testing.assert_close(unlimited.logits, expected.logits)


def test_predict_uses_the_models_limit(small_side_bundle, tmp_path, capsys):
    from emovlm_kd.cli import main
    from emovlm_kd.inference import run_batch

    folder, model, processor = small_side_bundle
    exif = Image.Exif()
    exif[0x0112] = 8
    random_image(150, 90, seed=5).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    assert main(["predict", "--model", str(folder), str(tmp_path / "photo.jpg")]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    with Image.open(tmp_path / "photo.jpg") as raw:
        expected = run_batch(model, processor, [prepare_image(raw, max_side=SIDE)]).logits[0].softmax(-1)
    got = torch.tensor([record["scores"][label] for label in model.config.labels])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _dataset(images, labels):
    import datasets

    names = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
    return datasets.Dataset.from_dict(
        {"id": [f"img{i}" for i in range(len(images))], "image": images, "label": labels},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names)}),
    )


def test_evaluate_and_the_training_cache_use_the_models_limit(small_side_bundle, tmp_path):
    from emovlm_kd.evaluation.runner import predict_split
    from emovlm_kd.inference import run_batch
    from emovlm_kd.training.cache import TensorCache
    from emovlm_kd.training.passes import vlm_pass_cache

    _, model, processor = small_side_bundle
    raw = [random_image(120, 100, seed=6), random_image(90, 140, seed=7), random_image(300, 40, seed=8)]
    data = _dataset(raw, [0, 1, 2])
    expected = run_batch(model, processor, [prepare_image(image, max_side=SIDE) for image in data["image"]])
    arrays = predict_split(model, processor, data, batch_size=2)
    np.testing.assert_allclose(arrays["final_probs"], expected.logits.softmax(-1).numpy(), atol=1e-5)
    cache = TensorCache(tmp_path / "cache")
    cached = vlm_pass_cache(cache, model, processor, data, "test", batch_size=2)
    torch.testing.assert_close(cached["image_embeds"], expected.image_embeds)
    first = sorted(p.name for p in cache.root.iterdir())
    model.config.max_image_side = 1024
    try:
        vlm_pass_cache(cache, model, processor, data, "test", batch_size=2)
    finally:
        model.config.max_image_side = SIDE
    assert sorted(p.name for p in cache.root.iterdir()) != first  # another limit, another cache


def test_sft_rows_go_through_the_inference_path(tmp_path):
    from emovlm_kd.training.sft import sft_dataset

    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(200, 120, seed=9).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgba = np.array(random_image(80, 60, seed=10).convert("RGBA"))
    rgba[:30, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    train = _dataset([str(tmp_path / "rotated.jpg"), str(tmp_path / "rgba.png")], [0, 1])
    rows = [{"id": f"img{i}", "kind": "categorical", "question": "Which emotion?", "answer": "{'emotion': 'awe'}"}
            for i in range(2)]
    (tmp_path / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = sft_dataset(train, tmp_path / "instructions.jsonl", max_side=SIDE)
    for row, name in zip(data, ("rotated.jpg", "rgba.png")):
        with Image.open(tmp_path / name) as raw:
            expected = np.asarray(prepare_image(raw, max_side=SIDE))
        got = row["images"][0]
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), expected), name
    assert data[0]["images"][0].size == (34, 56)  # upright (portrait), long side SIDE
