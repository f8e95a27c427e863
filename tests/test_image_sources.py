"""One image path (issue 13 item 3): a path, a PIL image, an array, a tensor, a data URL and an http URL of the same
file give the same pixels, and the pipeline gives the same scores for a path and a PIL image (16-bit, alpha,
palette, EXIF orientation: what transformers' `load_image` flattens on its own)."""

import base64
import functools
import http.server
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_emovlm_kd import open_image, prepare_image

ORIENTATION = 0x0112


def sixteen_bit(tmp_path):
    values = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)  # 0..65246
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def with_alpha(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    pixels[..., 3] = np.linspace(0, 255, 56, dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def palette_with_transparency(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).quantize(16)
    path = tmp_path / "palette.png"
    image.save(path, transparency=3)
    return path


def rotated_jpeg(tmp_path):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[ORIENTATION] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    return path


FILES = [sixteen_bit, with_alpha, palette_with_transparency, rotated_jpeg]


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("make", FILES, ids=lambda f: f.__name__)
def test_a_path_a_pil_image_and_a_data_url_give_the_same_pixels(tmp_path, make):
    path = make(tmp_path)
    reference = pixels(prepare_image(Image.open(path), max_side=1024))
    data = base64.b64encode(path.read_bytes()).decode()
    for source in (str(path), f"data:image/png;base64,{data}", data):
        np.testing.assert_array_equal(pixels(prepare_image(source, max_side=1024)), reference)


def test_sixteen_bit_and_alpha_are_not_flattened_by_transformers_loader(tmp_path):
    """What `load_image` would give (RGB straight from the file) differs from our scaling and compositing."""
    from transformers.image_utils import load_image

    for path in (sixteen_bit(tmp_path), with_alpha(tmp_path)):
        ours = pixels(prepare_image(str(path)))
        assert not np.array_equal(ours, pixels(load_image(str(path))))
        np.testing.assert_array_equal(ours, pixels(prepare_image(Image.open(path))))


def test_the_exif_orientation_is_applied_once_from_a_path(tmp_path):
    path = rotated_jpeg(tmp_path)
    assert prepare_image(str(path)).size == (30, 50)  # 50 x 30 stored, rotated by 90 degrees


def test_arrays_and_tensors_take_the_same_path():
    array = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    reference = pixels(prepare_image(Image.fromarray(array)))
    np.testing.assert_array_equal(pixels(prepare_image(array)), reference)
    np.testing.assert_array_equal(pixels(prepare_image(torch.from_numpy(array).permute(2, 0, 1))), reference)


def test_an_http_url_takes_the_same_path(tmp_path):
    path = with_alpha(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        np.testing.assert_array_equal(pixels(prepare_image(url, timeout=10)), pixels(prepare_image(Image.open(path))))
    finally:
        server.shutdown()


def test_a_string_that_is_no_image_source_is_a_clear_error():
    with pytest.raises(ValueError, match="not an image file, URL or base64 image"):
        open_image("no/such/file.png")


def test_the_pipeline_scores_a_path_and_its_pil_image_the_same(tiny_bundle_dir, tmp_path):
    from transformers import pipeline

    classify = pipeline(model=str(tiny_bundle_dir), trust_remote_code=True, device="cpu")
    for path in (sixteen_bit(tmp_path), with_alpha(tmp_path)):
        by_path = classify(str(path), top_k=None)
        by_image = classify(Image.open(path), top_k=None)
        assert [p["label"] for p in by_path] == [p["label"] for p in by_image]
        np.testing.assert_allclose([p["score"] for p in by_path], [p["score"] for p in by_image], rtol=0, atol=1e-6)
