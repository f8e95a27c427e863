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
