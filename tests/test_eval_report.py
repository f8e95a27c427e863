"""emovlm_kd.evaluation.report and .plots without a model: hand-computed aggregation, records, Markdown, figures, writing."""

import json

import numpy as np
import pytest

from emovlm_kd.evaluation.report import (
    accuracies_from_records,
    atomic_write,
    build_report,
    complementarity,
    correctness,
    gate_decisions,
    prediction_records,
    render_markdown,
    write_jsonl,
)

LABELS = ["awe", "fear", "sadness"]
REFERENCES = [0, 1, 2, 0, 1, 2]
PREDICTIONS = {
    "vlm": [0, 1, -1, 1, 1, 0],  # right: T T F F T F (sample 2 named no label)
    "distill": [0, 0, 2, 0, 2, 2],  # right: T F T T F T
    "emovlm_kd": [0, 1, 2, 0, 2, 1],  # right: T T T T F F
}


def _probs(predictions, confidence=0.8, num_classes=3):
    rows = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    for i, p in enumerate(predictions):
        rows[i, p] = confidence
    return rows


@pytest.fixture(scope="module")
def report():
    probabilities = {p: _probs(PREDICTIONS[p]) for p in ("distill", "emovlm_kd")}
    return build_report(LABELS, REFERENCES, PREDICTIONS, probabilities, meta={"dataset": "hand"},
                        parameters={"vlm": 100, "distill": 10, "emovlm_kd": 116})


def test_complementarity_counts_sum_to_n():
    counts = complementarity([1, 1, 0, 0, 1], [1, 0, 1, 0, 0], "vlm", "teacher")
    assert counts == {"both_correct": 1, "vlm_only": 2, "teacher_only": 1, "neither": 1}
    rng = np.random.default_rng(0)
    a, b = rng.random(101) > 0.4, rng.random(101) > 0.6
    assert sum(complementarity(a, b).values()) == 101
    with pytest.raises(ValueError):
        complementarity([1, 0], [1])


def test_gate_decisions_by_hand():
    gate = gate_decisions(PREDICTIONS["vlm"], PREDICTIONS["distill"], PREDICTIONS["emovlm_kd"], REFERENCES)
    assert gate == {
        "disagreements": 5, "followed_vlm": 1, "followed_distill": 3, "followed_neither": 1,
        "vlm_correct": 2, "distill_correct": 3, "gate_correct": 3, "agreements": 1, "overrode_agreement": 0,
    }  # fmt: skip
    assert gate["followed_vlm"] + gate["followed_distill"] + gate["followed_neither"] == gate["disagreements"]


def test_report_by_hand(report):
    assert report["num_samples"] == 6 and report["final"] == "emovlm_kd" and report["zero_shot"] is False
    assert report["dataset"] == "hand" and report["support"] == [2, 2, 2]
    assert report["accuracy"] == pytest.approx({"vlm": 3 / 6, "distill": 4 / 6, "emovlm_kd": 4 / 6})
    # VLM: awe F1 2/(2+1+1) = 0.5, fear 4/5, sadness 0 (the unanswered sample counts against it)
    assert report["macro_f1"]["vlm"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert report["no_answer"] == {"vlm": 1}
    assert report["confusion_matrix"]["vlm"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # answered samples only
    assert report["per_class_accuracy"]["emovlm_kd"] == {"awe": 1.0, "fear": 0.5, "sadness": 0.5}
    counts = report["complementarity"]["vlm_vs_distill"]
    assert counts == {"both_correct": 1, "vlm_only": 2, "distill_only": 3, "neither": 0}
    assert sum(counts.values()) == report["num_samples"]
    assert report["gate"]["disagreements"] == 5
    # every prediction has confidence 0.8; the head is right 4/6 -> |4/6 - 0.8|; vlm has no probabilities
    assert report["ece"] == pytest.approx({"distill": 0.8 - 4 / 6, "emovlm_kd": 0.8 - 4 / 6})
    assert report["parameters"] == {"vlm": 100, "distill": 10, "emovlm_kd": 116}
    json.dumps(report)  # JSON-ready


def test_zero_shot_and_teacher_reports():
    zero = build_report(LABELS, REFERENCES, {"vlm": PREDICTIONS["vlm"]})
    assert zero["zero_shot"] is True and zero["final"] == "vlm" and "gate" not in zero
    assert zero["complementarity"] == {} and list(zero["accuracy"]) == ["vlm"]
    teacher = [0, 1, 1, 1, 0, 2]  # right: T T F F F T
    both = build_report(LABELS, REFERENCES, {"vlm": PREDICTIONS["vlm"], "teacher": teacher})
    assert both["complementarity"] == {
        "vlm_vs_teacher": {"both_correct": 2, "vlm_only": 1, "teacher_only": 1, "neither": 2}
    }
    with pytest.raises(ValueError, match="unknown parts"):
        build_report(LABELS, REFERENCES, {"clip": teacher})


def test_records_carry_every_part_and_recompute_the_accuracies(report, tmp_path):
    probabilities = {p: _probs(PREDICTIONS[p]) for p in ("distill", "emovlm_kd")}
    records = prediction_records(LABELS, REFERENCES, PREDICTIONS, probabilities, ids=[f"s{i}" for i in range(6)],
                                 paths=[None] * 5 + ["/data/x.png"], extra={"vlm_answer": [None] * 2 + ["hm"] * 4})
    assert records[0] == {"index": 0, "id": "s0", "label": "awe",
                          "predictions": {"vlm": "awe", "distill": "awe", "emovlm_kd": "awe"},
                          "confidence": {"distill": 0.8, "emovlm_kd": 0.8}}  # fmt: skip
    assert records[2]["predictions"]["vlm"] is None and records[2]["vlm_answer"] == "hm"
    assert records[5]["path"] == "/data/x.png"
    write_jsonl(tmp_path / "p.jsonl", records)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert accuracies_from_records(lines) == report["accuracy"]


def test_each_accuracy_has_a_bootstrap_interval_and_each_branch_a_paired_test(report, tmp_path):
    from emovlm_kd.evaluation.stats import bootstrap_ci, mcnemar, paired_correctness

    right = correctness(PREDICTIONS, REFERENCES)
    assert right["vlm"].tolist() == [True, True, False, False, True, False]  # -1 (no answer) is wrong
    for part, (low, high) in report["accuracy_ci"].items():
        assert 0 <= low <= report["accuracy"][part] <= high <= 1
        assert [100 * low, 100 * high] == pytest.approx(bootstrap_ci(right[part]), abs=1e-4)
    assert report["accuracy_ci_method"]["resamples"] == 10000 and report["accuracy_ci_method"]["confidence"] == 0.95
    # VLM right, gate wrong: sample 4; gate right, VLM wrong: samples 2, 3. Head only: 5; gate only: 1.
    assert report["mcnemar"]["vlm_vs_emovlm_kd"] | {"p_value": None} == {
        "b": 1, "c": 2, "statistic": 1.0, "p_value": None, "method": "exact"}
    assert report["mcnemar"]["vlm_vs_emovlm_kd"]["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1 | Bin(3, 1/2))
    assert (report["mcnemar"]["distill_vs_emovlm_kd"]["b"], report["mcnemar"]["distill_vs_emovlm_kd"]["c"]) == (1, 1)
    # The same test from the written predictions, paired by image id (how two runs are compared).
    records = prediction_records(LABELS, REFERENCES, PREDICTIONS, ids=[f"s{i}" for i in range(6)])
    vlm, gate, _ = paired_correctness(records, list(reversed(records)), "vlm", "emovlm_kd")
    assert mcnemar(vlm, gate).as_dict() == report["mcnemar"]["vlm_vs_emovlm_kd"]
    assert "gate" not in build_report(LABELS, REFERENCES, {"vlm": PREDICTIONS["vlm"]})["mcnemar"]


def test_a_large_gap_is_significant_and_a_tie_is_not():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 3, 400)
    gate = np.where(rng.random(400) < 0.8, references, (references + 1) % 3)
    vlm = np.where(rng.random(400) < 0.6, references, (references + 2) % 3)
    tests = build_report(LABELS, references, {"vlm": vlm, "distill": gate.copy(), "emovlm_kd": gate})["mcnemar"]
    assert tests["vlm_vs_emovlm_kd"]["method"] == "chi2" and tests["vlm_vs_emovlm_kd"]["p_value"] < 1e-6
    assert tests["distill_vs_emovlm_kd"] == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}


def test_markdown_has_every_table(report):
    text = render_markdown(report)
    for heading in ("Table 2", "Figure 1", "disagree", "Per-class accuracy", "Confusion matrix of EmoVLM-KD",
                    "95 % CI", "Paired tests (McNemar)", "| VLM vs EmoVLM-KD | 1 | 2 | exact binomial | 1.000 |"):
        assert heading in text
    assert "| VLM | 100 | 50.00 |" in text
    assert "named no label" in text and "complementarity.png" in text
    assert "complementarity.png" not in render_markdown(report, images=())


def test_figures_are_png_files(report, tmp_path):
    from emovlm_kd.evaluation.plots import plot_complementarity, plot_confusion_matrices

    assert plot_confusion_matrices(report, tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_complementarity(report, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    zero = build_report(LABELS, REFERENCES, {"vlm": PREDICTIONS["vlm"]})
    assert plot_complementarity(zero, tmp_path / "none.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "cm.png"]  # no temporary files left


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def fail(handle):
        handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_complementarity_chart_names_both_branches_and_shows_counts(report, tmp_path, monkeypatch):
    """Every pair's two "only" segments are named with their counts, and the gate panel gives counts too."""
    from emovlm_kd.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_complementarity(report, tmp_path / "complementarity.png")
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    titles = plots.PART_TITLES
    counts = report["complementarity"]["vlm_vs_distill"]
    assert f"{titles['vlm']} only: {counts['vlm_only']}   {titles['distill']} only: {counts['distill_only']}" in texts
    gate = report["gate"]
    assert f"{gate['followed_distill']} ({100 * gate['followed_distill'] / gate['disagreements']:.1f}%)" in texts
    labels = [t.get_text() for t in figures[0].axes[1].get_yticklabels()]
    assert "gate followed the head" in labels and "the head was right" in labels


def test_limit_takes_a_stratified_sample_in_the_datasets_order():
    """`--limit 16` on a dataset sorted by class holds every class in proportion, not the first two classes."""
    from datasets import ClassLabel, Dataset, Features, Value

    from emovlm_kd.evaluation.runner import stratified_quota, take

    labels = [0] * 40 + [1] * 20 + [2] * 10 + [3] * 10 + [4] * 2
    data = Dataset.from_dict({"id": list(range(len(labels))), "label": labels},
                             features=Features({"id": Value("int64"), "label": ClassLabel(num_classes=5)}))
    sample = take(data, 16)
    assert np.bincount(sample["label"], minlength=5).tolist() == [7, 4, 2, 2, 1]  # one each, the rest by count
    assert sample["id"] == sorted(sample["id"]) and take(data, 16)["id"] == sample["id"]  # ordered, seeded
    assert take(data, 16, seed=1)["id"] != sample["id"]
    assert stratified_quota([5, 3, 1], 2).tolist() == [1, 1, 0]  # fewer rows than classes: the largest classes
    assert stratified_quota([5, 3, 1], 9).tolist() == [5, 3, 1] and take(data, None) is data


@pytest.mark.parametrize("meta, shown", [
    ({"dataset_format": "fi", "split": "test", "limit": None}, True),
    ({"dataset_format": "imagefolder", "split": "test", "limit": None}, False),  # e.g. the synthetic demo
    ({"dataset_format": "fi", "split": "test", "limit": 16}, False),  # a sample is not the paper's test set
    ({"dataset_format": "fi", "split": "val", "limit": None}, False),
])
def test_the_papers_fi_column_stands_only_beside_a_full_fi_test_split(meta, shown):
    report = build_report(LABELS, REFERENCES, PREDICTIONS, {p: _probs(PREDICTIONS[p]) for p in ("distill", "emovlm_kd")},
                          meta=meta)
    assert ("paper, FI (%)" in render_markdown(report)) is shown


def test_the_detected_layout_names_fi_only_for_the_fi_layout(tmp_path):
    from emovlm_kd.data.loading import dataset_format_of

    from dataset_fixtures import write_fi

    write_fi(tmp_path / "FI")
    assert dataset_format_of(str(tmp_path / "FI")) == "fi"
    (tmp_path / "mine" / "train" / "awe").mkdir(parents=True)
    assert dataset_format_of(str(tmp_path / "mine")) != "fi"
    assert dataset_format_of(str(tmp_path / "nope")) is None
