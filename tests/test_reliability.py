"""Reliability and safety rules: odd and broken inputs, usage errors, crash-safe outputs, safetensors only, secrets.

Every odd file is written by the test itself; `emovlm-kd` runs in-process through `emovlm_kd.cli.main`.
"""

import ast
import http.server
import json
import logging
import re
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from http_fixtures import ANSWER, QuietHandler
from PIL import Image

from emovlm_kd.cli import main
from emovlm_kd.labels import MIKELS8

ROOT = Path(__file__).resolve().parents[1]
HUB_FILES = ("configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "scoring_emovlm_kd.py")
# torch, transformers, the Hub files themselves and the standard library (what any transformers install has)
HUB_IMPORTS = {"torch", "transformers", "configuration_emovlm_kd", "modeling_emovlm_kd", "scoring_emovlm_kd",
               *sys.stdlib_module_names}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"}


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def predict(capsys, *argv):
    """(exit status, {file name: record}, stderr, records in order) of `emovlm-kd predict argv`, in-process."""
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, {Path(record["path"]).name: record for record in records}, err, records


def png_header_only(width, height):
    """A PNG whose header claims `width` x `height` pixels and holds no image data (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------- Inputs


def write_odd_images(folder):
    """Every mode, format, orientation, size and file name the issue lists, plus references for GIF and EXIF."""
    folder.mkdir()
    base = noise(50, 40, 1)
    rgba = np.array(base.convert("RGBA"))
    rgba[:20, :, 3] = 0  # top half transparent
    Image.fromarray(rgba).save(folder / "rgba.png")
    base.convert("L").save(folder / "grey.png")
    base.convert("P").save(folder / "palette.png", transparency=0)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = (np.random.default_rng(2).random((40, 50)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    first, second = noise(48, 40, 3), noise(48, 40, 4)
    first.save(folder / "animated.gif", save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(folder / "animated.gif") as gif:
        Image.fromarray(np.array(gif.convert("RGB"))).save(folder / "gif_frame0.png")
        gif.seek(1)
        Image.fromarray(np.array(gif.convert("RGB"))).save(folder / "gif_frame1.png")
    base.save(folder / "photo.webp", lossless=True)
    base.save(folder / "photo.bmp")
    base.save(folder / "photo.tiff")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    noise(64, 36, 5).save(folder / "exif6.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(folder / "exif6.jpg") as raw:  # the stored pixels, orientation not applied
        pixels = Image.fromarray(np.array(raw.convert("RGB")))
    pixels.save(folder / "exif6_raw.png")
    pixels.transpose(Image.Transpose.ROTATE_270).save(folder / "exif6_upright.png")
    noise(1, 1, 6).save(folder / "one_pixel.png")
    noise(3, 900, 7).save(folder / "tall.png")
    noise(2000, 5, 8).save(folder / "wide.png")
    base.save(folder / "with space.png")
    base.save(folder / "été 😀.png")
    base.save(folder / "UPPER.PNG")
    base.convert("RGB").save(folder / "UPPER.JPG")
    modes = {name: Image.open(folder / name).mode for name in ("rgba.png", "palette.png", "cmyk.jpg", "grey16.png")}
    assert modes == {"rgba.png": "RGBA", "palette.png": "P", "cmyk.jpg": "CMYK", "grey16.png": "I;16"}
    assert Image.open(folder / "animated.gif").is_animated
    return sorted(path.name for path in folder.iterdir())


def test_predict_gives_every_odd_but_readable_image_a_prediction(tiny_bundle_dir, tmp_path, capsys):
    names = write_odd_images(tmp_path / "odd")
    code, records, err, lines = predict(capsys, "--model", str(tiny_bundle_dir), str(tmp_path / "odd"))

    assert code == 0, err
    assert sorted(records) == names and len(lines) == len(names)
    for name, record in records.items():
        assert "error" not in record, (name, record)
        assert record["label"] in MIKELS8 and 0 < record["score"] <= 1
        assert sum(record["scores"].values()) == pytest.approx(1, abs=1e-4), name
    assert f"predicted {len(names)}, skipped 0" in err

    def same(a, b):  # every branch's scores (the random tiny gate is near uniform; its VLM branch is not)
        branches = [(records[name]["scores"], records[name]["distill"]["scores"], records[name]["vlm"]["scores"])
                    for name in (a, b)]  # fmt: skip
        return all(abs(x[k] - y[k]) < 1e-5 for x, y in zip(*branches) for k in MIKELS8)

    assert same("animated.gif", "gif_frame0.png") and not same("animated.gif", "gif_frame1.png")
    assert same("exif6.jpg", "exif6_upright.png") and not same("exif6.jpg", "exif6_raw.png")


def test_odd_modes_keep_their_pixels(tmp_path):
    """Transparency is composited on white, 16-bit greyscale scaled to 8 bits, EXIF orientation applied once,
    tiny and extreme images fitted."""
    from emovlm_kd.images import MAX_ASPECT_RATIO, MIN_SIDE, load_image_file

    write_odd_images(tmp_path / "odd")
    rgba = np.asarray(load_image_file(tmp_path / "odd" / "rgba.png"), dtype=float)
    assert rgba[:20].min() == 255 and rgba[20:].mean() < 200  # transparent top is white, the rest is the picture
    grey16 = np.asarray(load_image_file(tmp_path / "odd" / "grey16.png"), dtype=float)
    stored = np.asarray(Image.open(tmp_path / "odd" / "grey16.png"), dtype=float) / 256
    assert abs(grey16.mean() - stored.mean()) < 2  # not clipped to white
    from pipeline_emovlm_kd import to_rgb

    with Image.open(tmp_path / "odd" / "exif6.jpg") as image:  # the pipeline's path: a PIL image, EXIF unapplied
        upright = np.asarray(to_rgb(image))
    assert np.array_equal(upright, np.asarray(Image.open(tmp_path / "odd" / "exif6_upright.png")))
    for name in ("one_pixel.png", "tall.png", "wide.png"):
        width, height = load_image_file(tmp_path / "odd" / name).size
        assert min(width, height) >= MIN_SIDE and max(width, height) / min(width, height) <= MAX_ASPECT_RATIO + 1
        assert width * height < 1_000_000, (name, width, height)  # padded, then upscaled: stays small


def test_one_image_path_for_files_pil_images_and_paths(tmp_path):
    """`emovlm_kd.images.prepare_image` is the pipeline's; reading a file is opening it plus that one function, and
    the EXIF orientation is applied exactly once on every route (files, PIL images, path strings)."""
    import emovlm_kd.images
    import pipeline_emovlm_kd
    from emovlm_kd.images import load_image_file, prepare_image

    assert emovlm_kd.images.prepare_image is pipeline_emovlm_kd.prepare_image
    names = write_odd_images(tmp_path / "odd")
    for name in names:
        with Image.open(tmp_path / "odd" / name) as image:
            expected = np.asarray(prepare_image(image))
        assert np.array_equal(np.asarray(load_image_file(tmp_path / "odd" / name)), expected), name
    upright = np.asarray(Image.open(tmp_path / "odd" / "exif6_upright.png"))
    assert np.array_equal(np.asarray(load_image_file(tmp_path / "odd" / "exif6.jpg")), upright)
    assert np.array_equal(np.asarray(prepare_image(str(tmp_path / "odd" / "exif6.jpg"))), upright)  # a path string
    for name in ("photo.bmp", "tall.png", "one_pixel.png"):  # strings are opened by transformers, then fitted alike
        path = tmp_path / "odd" / name
        assert np.array_equal(np.asarray(prepare_image(str(path))), np.asarray(load_image_file(path))), name


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_predict_reports_each_unreadable_file_and_goes_on(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    noise(50, 40).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    noise(64, 64).save(folder / "truncated.png")
    (folder / "truncated.png").write_bytes((folder / "truncated.png").read_bytes()[:300])
    (folder / "notes.jpg").write_text("not an image at all\n", encoding="utf-8")
    (folder / "bomb_header.png").write_bytes(png_header_only(100_000, 100_000))  # over any default limit
    Image.new("RGB", (120, 100)).save(folder / "over_limit.png")  # between one and two times the limit below
    Image.new("RGB", (200, 200)).save(folder / "over_twice_limit.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)

    code, records, err, lines = predict(capsys, "--model", str(tiny_bundle_dir), "--batch-size", "3", str(folder))

    assert code == 1
    assert len(lines) == 7 and sorted(records) == sorted(path.name for path in folder.iterdir())
    assert "label" in records["good.png"] and "error" not in records["good.png"]
    bad = {name: record for name, record in records.items() if name != "good.png"}
    for name, record in bad.items():
        assert record["error"] and "label" not in record, name
    assert "empty" in records["empty.png"]["error"]
    assert "not an image" in records["notes.jpg"]["error"]
    for name in ("bomb_header.png", "over_limit.png", "over_twice_limit.png"):
        assert "decompression bomb" in records[name]["error"], records[name]
    assert "predicted 1, skipped 6" in err


def test_predict_writes_each_batch_before_the_next(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    """Nothing computed is lost: a crash (here Ctrl-C) in the second batch leaves the first batch's lines."""
    import emovlm_kd.inference

    for i in range(3):
        noise(40, 40, i).save(tmp_path / f"{i}.png")
    real, calls = emovlm_kd.inference.run_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", interrupted)
    output = tmp_path / "out.jsonl"
    code = main(["predict", "--model", str(tiny_bundle_dir), "--batch-size", "1", "--output", str(output),
                 *(str(tmp_path / f"{i}.png") for i in range(3))])  # fmt: skip
    assert code == 130
    assert not output.exists()  # unfinished: the lines so far are in FILE.part (`--resume` continues it)
    lines = Path(f"{output}.part").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["label"] in MIKELS8


@pytest.mark.parametrize("case", ["missing model", "no inputs", "batch size 0", "unwritable output"])
def test_predict_usage_errors_exit_2(case, tiny_bundle_dir, tmp_path, capsys):
    noise(40, 40).save(tmp_path / "a.png")
    (tmp_path / "empty_folder").mkdir()
    argv = {
        "missing model": ["--model", str(tmp_path / "no_such_model"), str(tmp_path / "a.png")],
        "no inputs": ["--model", str(tiny_bundle_dir), str(tmp_path / "empty_folder")],
        "batch size 0": ["--model", str(tiny_bundle_dir), "--batch-size", "0", str(tmp_path / "a.png")],
        "unwritable output": ["--model", str(tiny_bundle_dir), "--output", str(tmp_path / "no" / "out.jsonl"),
                              str(tmp_path / "a.png")],  # fmt: skip
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    named = {"missing model": "--model", "no inputs": "no input images", "batch size 0": "--batch-size"}
    assert named.get(case, "--output") in err


# ------------------------------------------------------------------------------------------ Dataset and teacher


def test_a_teacher_whose_labels_differ_from_the_dataset_stops(tmp_path):
    from transformers import ViTConfig

    from emovlm_kd.training.teacher import check_teacher_labels

    labels = ["Negative", "Positive"]
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})  # fmt: skip
    config.save_pretrained(tmp_path / "teacher")
    check_teacher_labels(tmp_path / "teacher", ["negative", "positive"])  # same labels (case aside): fine
    with pytest.raises(ValueError, match="negative.*positive.*amusement"):
        check_teacher_labels(tmp_path / "teacher", MIKELS8)
    with pytest.raises(ValueError, match="teacher"):
        check_teacher_labels(tmp_path / "teacher", ["positive", "negative"])  # same set, another order


# ----------------------------------------------------------------------------------------------- Config and flags


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--gate-type", "attention"], "--gate-type"),
        (["--dataset", "{tmp}/nonexistent"], "--dataset"),
        (["--config", "{tmp}/unknown_key.yaml"], "alpah"),
        (["--config", "{tmp}/malformed.yaml"], "malformed.yaml"),
        (["--config", "{tmp}/not_a_mapping.yaml"], "not_a_mapping.yaml"),
        (["--config", "{tmp}/wrong_type.yaml"], "alpha"),
        (["--config", "{tmp}/missing.yaml"], "missing.yaml"),
    ],
)
def test_train_rejects_bad_settings_at_start(flags, named, tmp_path, capsys):
    (tmp_path / "unknown_key.yaml").write_text("alpah: 0.3\n", encoding="utf-8")
    (tmp_path / "malformed.yaml").write_text("alpha: [0.3\n", encoding="utf-8")
    (tmp_path / "not_a_mapping.yaml").write_text("- alpha\n- 0.3\n", encoding="utf-8")
    (tmp_path / "wrong_type.yaml").write_text("alpha: high\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(run_dir), *(flag.format(tmp=tmp_path) for flag in flags)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not run_dir.exists()  # failed before any model or data work
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------------------------------- Safety


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
            "__import__", "import_module"
        ):  # fmt: skip
            yield "<dynamic import>"


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_import_only_torch_transformers_and_each_other(name):
    modules = {module.split(".")[0] for module in imported_modules(ROOT / name)}
    assert modules <= HUB_IMPORTS, f"{name} imports {sorted(modules - HUB_IMPORTS)}"


def test_no_torch_load_or_pickle_outside_tests():
    pattern = re.compile(r"torch\.load\(|\bpickle\b|\bdill\b|\bjoblib\b|weights_only\s*=\s*False")
    offenders = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "build") or ".egg-info" in str(relative) or relative.parts[0][0] == ".":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_bundles_and_caches_hold_only_safetensors_weights(tiny_bundle_dir, tmp_path):
    import torch

    from emovlm_kd.training.cache import TensorCache

    cache = TensorCache(tmp_path / "run" / "cache")
    cache.put("vlm_pass-train", "abc", {"image_embeds": torch.randn(3, 8)}, metadata={"split": "train"})
    cache.put("vlm_pass-train", "def", {"image_embeds": torch.randn(3, 8)})  # replaces the stale one
    for folder in (Path(tiny_bundle_dir), tmp_path / "run"):
        weights = [p.name for p in folder.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES]
        assert weights and all(name.endswith(".safetensors") for name in weights), weights
    assert [p.name for p in (tmp_path / "run" / "cache").iterdir()] == ["vlm_pass-train-def.safetensors"]
    assert cache.get("vlm_pass-train", "def")["image_embeds"].shape == (3, 8)


class ChatServer(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that checks the bearer key and counts calls."""

    def __init__(self, key):
        self.key, self.calls = key, 0
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(QuietHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = self.path == "/v1/chat/completions" and self.headers.get("Authorization") == f"Bearer {self.server.key}"
        ok = ok and body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        self.server.calls += 1
        self.reply(200 if ok else 401, ANSWER)


@pytest.fixture
def chat_server(monkeypatch):
    key = "sk-test-" + "7f3c9a1e5b2d4680" * 2
    monkeypatch.setenv("EMOVLM_KD_API_KEY", key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = ChatServer(key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def two_images(tmp_path):
    from emovlm_kd.data import load_image_dataset, make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "data", labels=["negative", "positive"], per_class=(1, 0, 0))
    return load_image_dataset(root, val_fraction=0)["train"]


QUESTIONS = ["Describe the image.", "Why does it feel this way?"]


def test_the_annotator_key_never_reaches_files_or_logs(chat_server, two_images, tmp_path, caplog):
    from emovlm_kd.training.annotate import annotate_split, build_annotator

    cfg = SimpleNamespace(annotator="openai", annotator_url=chat_server.url, annotator_model="m")
    out = tmp_path / "run" / "annotations.jsonl"
    with caplog.at_level(logging.DEBUG):
        rows = annotate_split(cfg, two_images, out, QUESTIONS)
        assert chat_server.calls == 4
        assert [row["answer"] for row in rows] == ["A calm scene."] * 4
        assert {(row["id"], row["kind"]) for row in rows} == {
            (i, kind) for i in two_images["id"] for kind in ("conversation", "reasoning")
        }
        assert len(annotate_split(cfg, two_images, out, QUESTIONS)) == 4  # a rerun asks nothing again
        assert chat_server.calls == 4
        annotator = build_annotator(cfg)
    key = chat_server.key
    assert key not in caplog.text and key not in repr(annotator) and key not in str(vars(cfg))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_annotations_resume_after_a_line_cut_by_a_crash(chat_server, two_images, tmp_path):
    from emovlm_kd.training.annotate import annotate_split

    cfg = SimpleNamespace(annotator="openai", annotator_url=chat_server.url, annotator_model="m")
    out = tmp_path / "annotations.jsonl"
    annotate_split(cfg, two_images, out, QUESTIONS)
    text = out.read_text(encoding="utf-8")
    out.write_text(text[: len(text) - 10], encoding="utf-8")  # the last answer cut mid-line
    rows = annotate_split(cfg, two_images, out, QUESTIONS)
    assert chat_server.calls == 5 and len(rows) == 4  # only the cut pair asked again
    assert len(annotate_split(cfg, two_images, out, QUESTIONS)) == 4 and chat_server.calls == 5
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["answer"] == "A calm scene."  # the cut line stays on its own


def test_tiny_never_deletes_a_users_files(tmp_path, capsys, monkeypatch):
    """`emovlm-kd tiny DIR` into a folder holding other files stops and keeps them; a bundle folder is replaced;
    `--overwrite` is the explicit way to replace the rest; `.` is a folder like any other."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("important")
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", str(folder)])
    assert exit_info.value.code == 2 and "notes.txt" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "important" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert main(["tiny", str(tmp_path / "bundle")]) == 0
    assert main(["tiny", str(tmp_path / "bundle")]) == 0  # a bundle is ours: rewritten in place
    assert main(["tiny", str(folder), "--overwrite"]) == 0 and not (folder / "notes.txt").exists()
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["tiny", "."]) == 0 and (empty / "config.json").exists()
