"""`emovlm-kd evaluate` and `emovlm-kd table1` end to end on tiny models and 16 generated images (offline)."""

import json

import pytest
import torch

from emovlm_kd.cli import main
from emovlm_kd.labels import MIKELS8

NUM_TEST = 16  # 8 classes x 2 test images


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from emovlm_kd.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "FI", per_class=(1, 0, 2), image_size=40)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny ViT whose labels are the dataset's in another order (the evaluation must reorder them)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = list(reversed(MIKELS8))
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    path = tmp_path_factory.mktemp("teacher") / "vit"
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _evaluate(model, dataset, out, *extra):
    return main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--output-dir", str(out),
                 "--batch-size", "8", "--device", "cpu", *extra])


def _read(out):
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return report, records


@pytest.fixture(scope="module")
def evaluated(tiny_bundle_dir, dataset_dir, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run1"
    assert _evaluate(tiny_bundle_dir, dataset_dir, out, "--teacher", str(teacher_dir)) == 0
    return out


def test_evaluate_writes_every_file(evaluated):
    for name in ("report.json", "predictions.jsonl", "report.md", "confusion_matrix.png", "complementarity.png"):
        assert (evaluated / name).stat().st_size > 0, name
    assert not [p for p in evaluated.iterdir() if p.name.startswith(".")]  # no temporary files left
    text = (evaluated / "report.md").read_text()
    assert "ViT teacher" in text and "Figure 1" in text


def test_report_is_consistent_with_predictions(evaluated):
    report, records = _read(evaluated)
    assert report["num_samples"] == len(records) == NUM_TEST
    assert report["labels"] == list(MIKELS8) and report["zero_shot"] is False
    assert set(report["accuracy"]) == set(report["macro_f1"]) == {"vlm", "distill", "emovlm_kd", "teacher"}
    from emovlm_kd.evaluation.report import accuracies_from_records

    assert accuracies_from_records(records) == pytest.approx(report["accuracy"])
    for pair in ("vlm_vs_distill", "vlm_vs_teacher"):
        counts = report["complementarity"][pair]
        assert sum(counts.values()) == NUM_TEST
        a, b = pair.split("_vs_")
        both = sum(r["predictions"][a] == r["label"] and r["predictions"][b] == r["label"] for r in records)
        assert counts["both_correct"] == both
    gate = report["gate"]
    disagreements = [r for r in records if r["predictions"]["vlm"] != r["predictions"]["distill"]]
    assert gate["disagreements"] == len(disagreements)
    assert gate["followed_vlm"] == sum(r["predictions"]["emovlm_kd"] == r["predictions"]["vlm"] for r in disagreements)
    assert 0.0 <= report["ece"]["emovlm_kd"] <= 1.0
    for part, matrix in report["confusion_matrix"].items():
        assert sum(map(sum, matrix)) == NUM_TEST - report["no_answer"].get(part, 0)
    assert report["parameters"]["emovlm_kd"] > report["parameters"]["vlm"] > report["parameters"]["distill"]
    first = records[0]
    assert first["id"] == "test/amusement/amusement_0.png" and first["path"].endswith("amusement_0.png")
    assert first["label"] == "amusement" and set(first["predictions"]) == set(report["accuracy"])


def test_predictions_match_the_model_and_teacher(evaluated, tiny_bundle_dir, dataset_dir, teacher_dir):
    """predictions.jsonl says what the model and the teacher say, in the dataset's label order."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from emovlm_kd.hub import load_bundle
    from emovlm_kd.images import load_image_file
    from emovlm_kd.inference import describe, run_batch

    _, records = _read(evaluated)
    model, processor = load_bundle(tiny_bundle_dir)
    images = [load_image_file(dataset_dir / r["id"]) for r in records[:8]]
    output = run_batch(model, processor, images)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = teacher(**AutoImageProcessor.from_pretrained(teacher_dir)(images=images, return_tensors="pt")).logits
    for i, record in enumerate(records[:8]):
        expected = describe(output, i, model.config.id2label)
        assert record["predictions"]["emovlm_kd"] == expected["label"]
        assert record["predictions"]["distill"] == expected["distill"]["label"]
        assert record["predictions"]["vlm"] == expected["vlm"]["label"]
        assert record["predictions"]["teacher"] == teacher.config.id2label[int(logits[i].argmax())]


def test_rerun_gives_the_same_report(evaluated, tiny_bundle_dir, dataset_dir, teacher_dir, tmp_path):
    assert _evaluate(tiny_bundle_dir, dataset_dir, tmp_path / "run2", "--teacher", str(teacher_dir)) == 0
    assert _read(tmp_path / "run2") == _read(evaluated)


def test_model_labels_in_another_order_are_reordered(tiny_bundle_dir, dataset_dir, tmp_path):
    """A bundle whose labels are the dataset's reversed: same set, reordered by name."""
    from emovlm_kd.hub import load_bundle, save_bundle
    from emovlm_kd.tiny import build_tiny_bundle

    model, processor = build_tiny_bundle(labels=list(reversed(MIKELS8)), seed=3)
    save_bundle(model, processor, tmp_path / "reversed")
    assert _evaluate(tmp_path / "reversed", dataset_dir, tmp_path / "out", "--limit", "4") == 0
    report, records = _read(tmp_path / "out")
    assert report["labels"] == list(MIKELS8) and len(records) == 4
    from emovlm_kd.images import load_image_file
    from emovlm_kd.inference import run_batch

    model, processor = load_bundle(tmp_path / "reversed")
    output = run_batch(model, processor, [load_image_file(dataset_dir / r["id"]) for r in records])
    for i, record in enumerate(records):
        assert record["predictions"]["emovlm_kd"] == model.config.id2label[int(output.logits[i].argmax())]
        assert record["confidence"]["emovlm_kd"] == pytest.approx(float(output.logits[i].softmax(-1).max()), abs=1e-5)


def test_zero_shot_on_a_bare_qwen2_vl(dataset_dir, tmp_path, capsys):
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_vlm

    processor = build_tiny_processor()
    build_tiny_vlm(processor.tokenizer).save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    assert _evaluate(tmp_path / "qwen", dataset_dir, tmp_path / "out", "--limit", "8", "--vlm-mode", "generate") == 0
    assert "zero-shot" in capsys.readouterr().out
    report, records = _read(tmp_path / "out")
    assert report["zero_shot"] is True and report["final"] == "vlm" and report["vlm_mode"] == "generate"
    assert list(report["accuracy"]) == ["vlm"] and "gate" not in report and report["complementarity"] == {}
    assert all(set(r["predictions"]) == {"vlm"} and "vlm_answer" in r for r in records)
    assert report["accuracy"]["vlm"] == pytest.approx(sum(r["predictions"]["vlm"] == r["label"] for r in records) / 8)
    assert (tmp_path / "out" / "confusion_matrix.png").exists() and (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--split", "validation"], "no split 'validation'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--teacher", "BINARY"], "missing from the teacher"),
    ],
)
def test_usage_errors_exit_2(tiny_bundle_dir, dataset_dir, tmp_path, capsys, flags, message):
    if "BINARY" in flags:
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, num_labels=2, id2label={0: "negative", 1: "positive"})
        ViTForImageClassification(config).save_pretrained(tmp_path / "binary")
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "binary")
        flags = ["--teacher", str(tmp_path / "binary")]
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(tiny_bundle_dir, dataset_dir, tmp_path / "out", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_model_with_other_labels_exits_2(dataset_dir, tmp_path, capsys):
    from emovlm_kd.hub import save_bundle
    from emovlm_kd.tiny import build_tiny_bundle

    save_bundle(*build_tiny_bundle(labels=["negative", "positive"]), tmp_path / "binary")
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(tmp_path / "binary", dataset_dir, tmp_path / "out")
    assert exit_info.value.code == 2
    assert "missing from the model: ['amusement'" in capsys.readouterr().err


def test_table1_over_present_datasets(tiny_bundle_dir, dataset_dir, tmp_path, capsys):
    """emoset (given by flag) and fi (found under the root, any case) are evaluated; a binary flickr is skipped for
    its labels; emotion6 and instagram are missing."""
    from emovlm_kd.data import make_synthetic_dataset

    root = tmp_path / "root"
    root.mkdir()
    (root / "FI").symlink_to(dataset_dir, target_is_directory=True)
    make_synthetic_dataset(root / "Flickr", labels=("negative", "positive"), per_class=(1, 0, 1), image_size=32)
    out = tmp_path / "table1"
    code = main(["table1", "--model", str(tiny_bundle_dir), "--data-root", str(root), "--dataset",
                 f"emoset={dataset_dir}", "--limit", "4", "--device", "cpu", "--output-dir", str(out)])
    assert code == 0
    table = json.loads((out / "table1.json").read_text())
    assert list(table["datasets"]) == ["emoset", "fi"]
    assert set(table["skipped"]) == {"emotion6", "flickr", "instagram"}
    assert "labels" in table["skipped"]["flickr"] and "not found" in table["skipped"]["emotion6"]
    for name in ("emoset", "fi"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["num_samples"] == 4
        assert table["this_model"][name] == round(100 * report["accuracy"]["emovlm_kd"], 2)
        assert table["datasets"][name]["accuracy_ci"] == report["accuracy_ci"]
        assert table["datasets"][name]["mcnemar"] == report["mcnemar"]
        assert set(report["mcnemar"]) == {"vlm_vs_emovlm_kd", "distill_vs_emovlm_kd"}
    assert table["datasets"]["emoset"]["accuracy"] == table["datasets"]["fi"]["accuracy"]  # same images, same model
    markdown = (out / "table1.md").read_text()
    assert "| EmoVLM-KD (paper) | 79.83 | 79.51 | 73.91 | 88.90 | 89.59 |" in markdown
    assert "**this model**" in markdown and "Skipped" in markdown
    # per dataset: this model's accuracy with its interval, the paper's EmoVLM-KD number beside it, paired tests
    low, high = table["datasets"]["fi"]["accuracy_ci"]["emovlm_kd"]
    accuracy = table["this_model"]["fi"]
    test = table["datasets"]["fi"]["mcnemar"]["vlm_vs_emovlm_kd"]
    assert (f"| FI | 4 | {accuracy:.2f} [{100 * low:.2f}, {100 * high:.2f}] | 79.51 | "
            in markdown), markdown
    assert f"{test['b']}/{test['c']}, p = " in markdown and "not on a sample (`--limit`)" in markdown
    assert "Table 1" in capsys.readouterr().out


def test_evaluate_model_on_an_in_memory_dataset(tiny_bundle):
    """The library entry point on any `datasets.Dataset` with `image` + ClassLabel `label` (no `id` column)."""
    import datasets
    import numpy as np
    from PIL import Image

    from emovlm_kd.evaluation.runner import bind_labels, evaluate_model, predict_split

    def random_image(width, height, seed):
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels)

    labels = ["sadness", "awe", "fear", "amusement", "anger", "contentment", "disgust", "excitement"]  # any order
    data = datasets.Dataset.from_dict(
        {"image": [random_image(40 + 8 * i, 48, seed=i) for i in range(5)], "label": [0, 1, 2, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)}),
    )
    model, processor = tiny_bundle
    bound, perm = bind_labels(model, processor, False, labels)
    assert [model.config.labels[i] for i in perm] == labels
    arrays = predict_split(bound, processor, data, label_perm=perm, batch_size=2)
    assert arrays["ids"] == ["0", "1", "2", "3", "4"] and arrays["references"].tolist() == [0, 1, 2, 1, 0]
    assert arrays["final_probs"].shape == (5, 8) and arrays["teacher_probs"] is None
    report = evaluate_model(bound, processor, data, None, label_perm=perm, batch_size=2)
    assert report["labels"] == labels and report["num_samples"] == 5
    assert report["accuracy"]["emovlm_kd"] == pytest.approx((arrays["final_probs"].argmax(-1) == [0, 1, 2, 1, 0]).mean())


# ----------------------------------------------------------------------------------------------------------------
# The data path (issue 25): decoding, prepare_image and the processors in DataLoader workers
# ----------------------------------------------------------------------------------------------------------------


def _in_line(model, processor, data, perm, teacher, teacher_processor, teacher_perm, batch_size, vlm_mode, seed=0):
    """`predict_split`'s arrays as it computed them before its data path moved to workers (d4ab06f `_RowPredictor`):
    each batch's rows decoded by `datasets` in this process, prepared (`prepare_image`, the model's bound; the
    teacher's copy unbounded), run through `run_batch` and the teacher."""
    import numpy as np

    from emovlm_kd.inference import PromptPrefixCache, run_batch
    from emovlm_kd.images import prepare_image

    torch.manual_seed(seed)
    cache, parts = PromptPrefixCache(), {}
    temperatures = {"final_probs": model.config.gate_calibration_temperature,
                    "distill_probs": model.config.head_calibration_temperature}
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        raw = batch["image"]
        images = [prepare_image(image, max_side=model.config.max_image_side) for image in raw]
        output = run_batch(model, processor, images, vlm_mode=vlm_mode, prompt_cache=cache)
        part = {"paths": [getattr(image, "filename", None) or None for image in raw],
                "vlm_scores": output.vlm_scores[:, perm], "vlm_found": output.vlm_answer_found.bool(),
                "vlm_answers": list(output.get("generated_text") or [None] * len(raw)),
                "references": [int(label) for label in batch["label"]], "ids": [str(i) for i in batch["id"]]}
        for key, logits in (("final_probs", output.logits), ("distill_probs", output.distill_logits)):
            part[key] = logits.softmax(-1)[:, perm]
            part[f"{key}_uncalibrated"] = (logits * temperatures[key]).softmax(-1)[:, perm]
        inputs = teacher_processor(images=[prepare_image(image) for image in raw], return_tensors="pt")
        with torch.inference_mode():
            part["teacher_probs"] = teacher(**inputs).logits.float().softmax(-1)[:, teacher_perm]
        for key, value in part.items():
            parts.setdefault(key, []).append(value)
    arrays = {key: torch.cat(value).numpy() if torch.is_tensor(value[0]) else [x for v in value for x in v]
              for key, value in parts.items()}
    arrays["references"] = np.asarray(arrays["references"], dtype=np.int64)
    if not any(arrays["vlm_answers"]):
        arrays["vlm_answers"] = None
    return arrays


def _same_arrays(got, want):
    import numpy as np

    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("sampled", [False, True], ids=["score", "generate-sampled"])
def test_predict_split_gives_the_same_arrays_with_workers_as_in_line(tiny_bundle, dataset_dir, teacher_dir, sampled):
    """Every array `predict_split` returns (each branch, the teacher, references, ids, paths; sampled answers too:
    the loader leaves the global RNG alone) is equal, bit for bit, with 0 and 2 workers and to the in-line path."""
    from emovlm_kd.evaluation.runner import (
        align_labels,
        bind_labels,
        dataset_label_names,
        load_split,
        load_teacher,
        predict_split,
        teacher_label_names,
    )

    data = load_split(str(dataset_dir), "test", limit=8)  # one image per class
    names = dataset_label_names(data)
    model, processor = tiny_bundle
    bound, perm = bind_labels(model, processor, False, names)
    teacher, teacher_processor = load_teacher(str(teacher_dir), device="cpu")
    teacher_perm = align_labels(teacher_label_names(teacher), names, "teacher")
    options = dict(label_perm=perm, teacher=teacher, teacher_processor=teacher_processor, teacher_perm=teacher_perm,
                   batch_size=3, vlm_mode="generate" if sampled else "score")  # 8 rows: a last batch of 2
    saved = bound.config.vlm_do_sample, bound.config.vlm_max_new_tokens
    bound.config.vlm_do_sample, bound.config.vlm_max_new_tokens = sampled, 8  # short answers: a fast test
    try:
        want = _in_line(bound, processor, data, perm, teacher, teacher_processor, teacher_perm, 3,
                        options["vlm_mode"])
        for workers in (0, 2):
            _same_arrays(predict_split(bound, processor, data, num_workers=workers, **options), want)
    finally:
        bound.config.vlm_do_sample, bound.config.vlm_max_new_tokens = saved
    assert all(path.endswith(row_id) for path, row_id in zip(want["paths"], want["ids"])) and len(want["ids"]) == 8
    assert (want["vlm_answers"] is not None) == sampled


def test_the_split_is_read_a_batch_at_a_time_and_decoded_only_by_the_data_path(tiny_bundle, dataset_dir,
                                                                             monkeypatch):
    """`load_split` and `predict_split` never decode an image through `datasets` (`dataset["image"]` on a split
    would decode all of it) nor read more than one batch of rows at once: the workers decode."""
    import datasets

    from emovlm_kd.evaluation.runner import bind_labels, dataset_label_names, load_split, predict_split

    def no_decoding(self, value, token_per_repo_id=None):
        raise AssertionError("an image was decoded by datasets")

    reads = []
    original = datasets.Dataset.__getitem__

    def recording(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(datasets.Image, "decode_example", no_decoding)
    monkeypatch.setattr(datasets.Dataset, "__getitem__", recording)
    data = load_split(str(dataset_dir), "test", limit=12)
    model, processor = tiny_bundle
    bound, perm = bind_labels(model, processor, False, dataset_label_names(data))
    arrays = predict_split(bound, processor, data, label_perm=perm, batch_size=4, num_workers=0)
    assert len(arrays["references"]) == 12 and arrays["final_probs"].shape == (12, 8)
    assert "image" not in [key for key in reads if isinstance(key, str)]
    rows = [key for key in reads if not isinstance(key, str)]
    assert rows and all(len(key) <= 4 for key in rows), rows


def test_an_image_that_does_not_read_is_an_input_error_naming_the_row(tiny_bundle):
    import datasets

    from emovlm_kd.errors import InputError
    from emovlm_kd.evaluation.runner import bind_labels, predict_split

    labels = list(MIKELS8)
    data = datasets.Dataset.from_dict(
        {"id": ["good", "broken"], "image": [_png_bytes(), {"bytes": b"not an image", "path": None}],
         "label": [0, 1]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=labels)}),
    )
    model, processor = tiny_bundle
    bound, perm = bind_labels(model, processor, False, labels)
    with pytest.raises(InputError, match=r"broken \(not an image"):
        predict_split(bound, processor, data, label_perm=perm, batch_size=2, num_workers=0)


def _png_bytes():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_evaluate_num_workers_gives_the_same_report(evaluated, tiny_bundle_dir, dataset_dir, teacher_dir, tmp_path):
    """`--num-workers 0` (decoding in the main process) writes what the default workers wrote."""
    assert _evaluate(tiny_bundle_dir, dataset_dir, tmp_path / "in-line", "--teacher", str(teacher_dir),
                     "--num-workers", "0") == 0
    assert _read(tmp_path / "in-line") == _read(evaluated)
