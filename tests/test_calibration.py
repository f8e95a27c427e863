"""Calibrated scores (issue 11): temperature scaling of the gate's and the head's logits, fitted on val after stage 4,
saved in the config, applied by the model's outputs and the pipeline, and shown before/after in `report.json`."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from emovlm_kd.cli import main
from emovlm_kd.training.calibration import BOUNDS, calibration_rows, fit_part, fit_temperature, nll

# ---------------------------------------------------------------------------------------------------------------
# The fit: a pure function
# ---------------------------------------------------------------------------------------------------------------


def sampled(n=20000, classes=5, seed=0):
    """Logits and labels drawn from softmax(logits): perfectly calibrated at T = 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    return logits, labels


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
def test_fit_recovers_the_temperature_that_made_the_logits_over_or_underconfident(scale):
    logits, labels = sampled()
    assert fit_temperature(logits * scale, labels) == pytest.approx(scale, rel=0.03)


def test_fit_is_the_minimum_of_the_nll_and_keeps_every_argmax():
    logits, labels = sampled(n=500, seed=1)
    logits = logits * 2.5 + torch.randn(500, 5, generator=torch.Generator().manual_seed(2))  # noisy, overconfident
    t = fit_temperature(logits, labels)
    grid = torch.logspace(-2, 2, 2001).tolist()
    best_on_grid = min(grid, key=lambda g: nll(logits, labels, g))
    assert t == pytest.approx(best_on_grid, rel=0.01)
    assert nll(logits, labels, t) <= min(nll(logits, labels, g) for g in grid) + 1e-9
    assert torch.equal((logits / t).argmax(-1), logits.argmax(-1))
    assert fit_temperature(logits, labels) == t  # deterministic


def test_fit_stops_at_the_bound_when_every_val_sample_is_right():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0]), bounds=(0.05, 20.0)) == pytest.approx(0.05, rel=1e-4)


def test_a_fit_at_a_bound_is_an_error_and_leaves_the_part_uncalibrated(caplog):
    # every image right: the NLL falls all the way to the lower bound, which is no calibration (scores of 0 and 1)
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]]), torch.tensor([0, 1, 0])
    assert fit_temperature(logits, labels) == pytest.approx(BOUNDS[0], rel=1e-4)
    with caplog.at_level("WARNING", logger="emovlm_kd.training.calibration"):
        record = fit_part("head", logits, labels, "val")
    assert record["temperature"] == 1.0 and record["fitted"] == pytest.approx(BOUNDS[0], rel=1e-4)
    assert "sits at a bound" in record["error"] and "0 misclassified" in record["error"]
    assert "head" in caplog.text and "sits at a bound" in caplog.text
    # a fit with a minimum inside the bounds is kept, without error
    logits, labels = sampled(n=2000, seed=3)
    record = fit_part("gate", logits * 3, labels, "val")
    assert record["error"] is None and record["temperature"] == pytest.approx(3.0, rel=0.1)
    assert record["val_nll_after"] < record["val_nll_before"] and record["images"] == 2000
    # nothing to fit on: uncalibrated, said
    empty = fit_part("gate", torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "val's calibration part")
    assert empty["temperature"] == 1.0 and "no image" in empty["error"]


def test_the_gate_trained_on_val_is_calibrated_on_a_stratified_part_it_never_saw():
    from emovlm_kd.training.gatedata import gate_training_set

    labels = torch.tensor([0, 1, 2] * 8 + [2, 2])  # 8, 8 and 10 images per class
    gate_rows, calibration = calibration_rows("val", labels, seed=5)
    assert sorted(gate_rows + calibration) == list(range(len(labels))) and not set(gate_rows) & set(calibration)
    assert np.bincount(labels[calibration].numpy()).tolist() == [4, 4, 5]  # half of each class
    assert calibration_rows("val", labels, seed=5) == (gate_rows, calibration)  # seeded
    assert calibration_rows("val", labels, seed=6)[1] != calibration
    # the gate's training rows are the others
    vectors = {"val": torch.arange(len(labels), dtype=torch.float32)[:, None], "train": torch.zeros(3, 1)}
    head = {"val": vectors["val"] * 10, "train": torch.zeros(3, 1)}
    scores, probs, targets = gate_training_set("val", vectors, head, {"val": labels, "train": torch.zeros(3)},
                                               val_rows=gate_rows)
    assert scores[:, 0].long().tolist() == gate_rows and targets.tolist() == labels[gate_rows].tolist()
    assert probs[:, 0].tolist() == [10.0 * row for row in gate_rows]
    # a gate that never trains on val is calibrated on all of it
    for protocol in ("train", "sampled"):
        assert calibration_rows(protocol, labels, seed=5) == (None, list(range(len(labels))))
    assert calibration_rows("val", torch.tensor([3]), seed=0) == ([0], [])  # one image: nothing to hold out


def test_fit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="N > 0"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="N > 0"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), bounds=(2.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Saved in the config, applied by the model and the pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["gate_calibration_temperature", "head_calibration_temperature"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_config_refuses_a_temperature_that_is_not_positive(field, value):
    from configuration_emovlm_kd import EmoVLMKDConfig

    with pytest.raises(ValueError, match=field):
        EmoVLMKDConfig(**{field: value})
    assert getattr(EmoVLMKDConfig(), field) == 1.0


@pytest.fixture
def calibrated_copy(tiny_bundle_dir, tmp_path):
    """A copy of the tiny bundle with temperatures written into its config.json: (folder, gate T, head T)."""
    folder = tmp_path / "calibrated"
    shutil.copytree(tiny_bundle_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(gate_calibration_temperature=0.4, head_calibration_temperature=2.5)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, 0.4, 2.5


def test_model_outputs_and_pipeline_divide_by_the_saved_temperatures(tiny_bundle_dir, calibrated_copy, images):
    from transformers import pipeline

    from emovlm_kd.hub import load_bundle
    from emovlm_kd.inference import run_batch

    folder, gate_t, head_t = calibrated_copy
    raw_model, processor = load_bundle(tiny_bundle_dir)
    model, _ = load_bundle(folder)
    assert (model.config.gate_calibration_temperature, model.config.head_calibration_temperature) == (gate_t, head_t)
    raw, calibrated = run_batch(raw_model, processor, images), run_batch(model, processor, images)
    torch.testing.assert_close(calibrated.logits, raw.logits / gate_t)
    torch.testing.assert_close(calibrated.distill_logits, raw.distill_logits / head_t)
    torch.testing.assert_close(calibrated.vlm_scores, raw.vlm_scores)  # the gate's inputs are untouched
    assert torch.equal(calibrated.logits.argmax(-1), raw.logits.argmax(-1))
    classify = pipeline(model=str(folder), trust_remote_code=True)
    by_label = {r["label"]: r["score"] for r in classify(images[0])}
    scores = torch.tensor([by_label[label] for label in model.config.labels])
    torch.testing.assert_close(scores, (raw.logits[0] / gate_t).softmax(-1), atol=1e-5, rtol=1e-4)


def test_report_shows_ece_before_and_after():
    from emovlm_kd.metrics import load_metric

    from emovlm_kd.evaluation.report import build_report, render_markdown

    references = [0, 1, 2, 0, 1, 2]
    logits = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [0, 3, 0], [3, 0, 0], [0, 0, 3]], dtype=float)
    t = 2.0
    after = torch.tensor(logits / t).softmax(-1).numpy()
    before = torch.tensor(logits).softmax(-1).numpy()
    predictions = {"distill": logits.argmax(-1), "emovlm_kd": logits.argmax(-1)}
    report = build_report(["a", "b", "c"], references, predictions, {"distill": after, "emovlm_kd": after},
                          temperatures={"distill": t, "emovlm_kd": t},
                          uncalibrated_probabilities={"distill": before, "emovlm_kd": before})
    ece = load_metric("ece")
    calibration = report["calibration"]
    assert calibration["temperature"] == {"distill": t, "emovlm_kd": t}
    assert calibration["ece_before"]["emovlm_kd"] == pytest.approx(
        ece.compute(probabilities=before, references=references)["ece"])
    assert calibration["ece_after"] == report["ece"]
    # 4/6 right; confidence 0.91 before, 0.69 after
    assert calibration["ece_after"]["emovlm_kd"] < calibration["ece_before"]["emovlm_kd"]
    assert "## Calibration" in render_markdown(report, images=())
    assert "calibration" not in build_report(["a", "b", "c"], references, predictions)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a noisy dataset of the test's own making, trained, calibrated and evaluated
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_run(tiny_inputs, tmp_path_factory):
    """A run on a synthetic dataset with 30 % of train labels wrong (seed 11; the demo's: 5 %, seed 0), 96 val and
    96 test images. The head and the gate train long enough to converge (their tensors are cached: 800 gate steps,
    fewer than the paper's 10 epochs over FI's train split); the VLM branch stays at chance (one SFT epoch)."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.training.runner import run_training

    _, vlm, teacher = tiny_inputs
    root = tmp_path_factory.mktemp("noisy")
    data = make_synthetic_dataset(root / "data", per_class=(16, 12, 12), label_noise=0.3, seed=11)
    cfg = tiny_settings(data, vlm, teacher, root / "run", sft_epochs=1.0, head_hidden_sizes=[64], distill_epochs=100.0,
                        distill_lr=1e-2, gate_epochs=200.0)
    return cfg, root / "run", run_training(cfg)


def test_training_fits_and_saves_the_temperatures(noisy_run):
    cfg, out, _ = noisy_run
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["gate_calibration_temperature"] != 1.0 and saved["head_calibration_temperature"] != 1.0
    assert saved["max_image_side"] == cfg.max_image_side == 1024
    # eval_results.json and the model card: each temperature, what it was fitted on, test ECE before and after
    record = json.loads((out / "eval_results.json").read_text())["calibration"]
    assert record["gate"]["temperature"] == round(saved["gate_calibration_temperature"], 4)
    assert record["head"]["temperature"] == round(saved["head_calibration_temperature"], 4)
    for part in ("gate", "head"):
        assert record[part]["error"] is None and record[part]["images"] == 96  # sampled gate data: all of val
        assert 0 <= record[part]["test_ece_after"] <= 1 and 0 <= record[part]["test_ece_before"] <= 1
    assert record["gate"]["test_ece_after"] < record["gate"]["test_ece_before"]
    card = (out / "model" / "README.md").read_text()
    assert f"| {record['gate']['temperature']:.4f} | val | {record['gate']['test_ece_before']:.4f} |" in card


def test_a_gate_trained_on_val_is_calibrated_on_the_val_images_it_never_saw(tiny_inputs, tmp_path):
    """`--gate-data val` (the demo's): the gate trains on a stratified half of val, its temperature is fitted on the
    other half (recorded by id), the head's on all of val; the results say so."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.training.runner import run_training

    _, vlm, teacher = tiny_inputs
    data = make_synthetic_dataset(tmp_path / "data", per_class=(4, 4, 2), held_out_noise=0.25, seed=3)
    results = run_training(tiny_settings(data, vlm, teacher, tmp_path / "run", gate_data="val"))
    calibration, gate_data = results["calibration"], results["gate_data"]
    ids = calibration["gate"]["ids"]
    val_ids = json.loads((tmp_path / "run" / "splits.json").read_text())["val"]
    assert len(set(ids)) == len(ids) and set(ids) <= set(val_ids) and len(val_ids) == 32
    held_out = len(ids)
    assert (gate_data["split"], gate_data["images"], gate_data["held_out_for_calibration"]) == (
        "val", 32 - held_out, held_out)
    # half of each class (ids are "val/<class folder>/<file>"; the noise leaves the classes with 2 to 6 images)
    for label, count in Counter(i.split("/")[1] for i in val_ids).items():
        assert sum(i.split("/")[1] == label for i in ids) in (count // 2, (count + 1) // 2), label
    assert calibration["gate"]["images"] == held_out and f"{held_out} of 32" in calibration["gate"]["fitted_on"]
    assert calibration["head"]["images"] == 32
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    for part in ("gate", "head"):
        assert calibration[part]["error"] is None
        assert round(saved[f"{part}_calibration_temperature"], 4) == calibration[part]["temperature"] != 1.0


def test_evaluate_reports_calibrated_ece_and_the_same_accuracy(noisy_run, tmp_path):
    cfg, out, results = noisy_run
    assert main(["evaluate", "--model", str(out / "model"), "--dataset", cfg.dataset, "--output-dir",
                 str(tmp_path / "after"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "after" / "report.json").read_text())
    calibration = report["calibration"]
    # the bar: EmoVLM-KD no worse calibrated than the head (+ 0.02), accuracy as trained
    assert report["ece"]["emovlm_kd"] <= report["ece"]["distill"] + 0.02
    assert report["accuracy"]["emovlm_kd"] == pytest.approx(results["accuracy"]["emovlm_kd"], abs=1e-4)
    assert report["accuracy"]["distill"] == pytest.approx(results["accuracy"]["distill"], abs=1e-4)
    assert calibration["ece_after"]["emovlm_kd"] < calibration["ece_before"]["emovlm_kd"]
    # the same model with the temperatures reset to 1: the report's "before" exactly, the same predictions
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(out / "model", uncalibrated)
    config = json.loads((uncalibrated / "config.json").read_text())
    config.update(gate_calibration_temperature=1.0, head_calibration_temperature=1.0)
    (uncalibrated / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", "--model", str(uncalibrated), "--dataset", cfg.dataset, "--output-dir",
                 str(tmp_path / "before"), "--device", "cpu"]) == 0
    before = json.loads((tmp_path / "before" / "report.json").read_text())
    assert before["accuracy"] == report["accuracy"]
    for part in ("distill", "emovlm_kd"):
        assert before["ece"][part] == pytest.approx(calibration["ece_before"][part], abs=1e-6)
    after_records = (tmp_path / "after" / "predictions.jsonl").read_text().splitlines()
    before_records = (tmp_path / "before" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["predictions"] for r in after_records] == [json.loads(r)["predictions"] for r in
                                                                     before_records]
