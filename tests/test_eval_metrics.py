"""The metric modules kept in eval/metrics: hand-computed values, edge cases, offline loading by path."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emovlm_kd.metrics import METRIC_NAMES, load_metric, metric_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in METRIC_NAMES}


def test_every_metric_is_a_module_folder_named_like_its_file():
    for name in METRIC_NAMES:
        assert (metric_path(name) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


def test_accuracy(metrics):
    acc = metrics["accuracy"]
    assert acc.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert acc.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], normalize=False) == {"accuracy": 3}
    assert acc.compute(predictions=[-1, 1], references=[0, 1])["accuracy"] == 0.5  # -1 = no answer, never right


def test_macro_f1_by_hand(metrics):
    f1 = metrics["macro_f1"]
    # class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: TP 2, FP 0, FN 1 -> 4/5; mean = 11/15
    result = f1.compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1])
    assert result["macro_f1"] == pytest.approx(11 / 15)
    assert result["f1_per_class"] == pytest.approx([2 / 3, 4 / 5])
    assert result["labels"] == [0, 1]
    # 3 classes: 0 TP1 FP0 FN1 -> 2/3; 1 TP1 FP1 FN1 -> 1/2; 2 TP0 FP1 FN0 -> 0 ; mean 7/18
    assert f1.compute(predictions=[0, 1, 2, 1], references=[0, 0, 1, 1])["macro_f1"] == pytest.approx(7 / 18)
    # an explicit label list with a class nobody predicts nor has: zero_division counts it
    fixed = f1.compute(predictions=[0, 1], references=[0, 1], labels=[0, 1, 2])
    assert fixed["macro_f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=[0, 1], references=[0, 1], labels=[0, 1, 2], zero_division=1.0)["macro_f1"] == 1.0


def test_per_class_accuracy_and_support(metrics):
    result = metrics["per_class_accuracy"].compute(predictions=[0, 1, 1, 2, -1], references=[0, 1, 2, 2, 2],
                                                   num_classes=4)
    assert result == {"per_class_accuracy": [1.0, 1.0, pytest.approx(1 / 3), None], "support": [1, 1, 3, 0]}


def test_confusion_matrix_rows_are_true_labels(metrics):
    cm = metrics["confusion_matrix"]
    assert cm.compute(predictions=[0, 1, 1], references=[0, 0, 1]) == {"confusion_matrix": [[1, 1], [0, 1]]}
    result = cm.compute(predictions=[2, 2, 0, 1], references=[0, 2, 0, 1], num_classes=3)["confusion_matrix"]
    assert result == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="class ids"):
        cm.compute(predictions=[3], references=[0], num_classes=3)


def test_ece_by_hand(metrics):
    ece = metrics["ece"]
    # 5 bins of width 0.2. Confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.5 (a tie: argmax 0, right),
    # 0.7 (wrong):
    # bin (0.8, 1.0]: {0.9}          acc 1,   conf 0.9  -> 1/5 * 0.1
    # bin (0.6, 0.8]: {0.8, 0.7}     acc 0,   conf 0.75 -> 2/5 * 0.75
    # bin (0.4, 0.6]: {0.6, 0.5}     acc 1,   conf 0.55 -> 2/5 * 0.45
    probabilities = [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5], [0.3, 0.7]]
    references = [0, 1, 1, 0, 0]
    result = ece.compute(probabilities=probabilities, references=references, n_bins=5)
    assert result["ece"] == pytest.approx(0.1 / 5 + 2 * 0.75 / 5 + 2 * 0.45 / 5)  # = 0.5
    assert result["bin_counts"] == [0, 0, 2, 2, 1]
    assert result["bin_accuracy"] == [None, None, 1.0, 0.0, 1.0]
    assert result["bin_confidence"][2:] == pytest.approx([0.55, 0.75, 0.9])


def test_ece_edges_and_defaults(metrics):
    ece = metrics["ece"]
    assert ece.compute(probabilities=[[1.0, 0.0], [0.0, 1.0]], references=[0, 1])["ece"] == 0.0
    assert ece.compute(probabilities=[[1.0, 0.0]], references=[1])["ece"] == 1.0
    # a confidence exactly on an edge belongs to the lower bin: 0.6 with 5 bins is in (0.4, 0.6]
    assert ece.compute(probabilities=[[0.6, 0.4]], references=[0], n_bins=5)["bin_counts"] == [0, 0, 1, 0, 0]
    assert len(ece.compute(probabilities=[[0.6, 0.4]], references=[0])["bin_counts"]) == 15
    with pytest.raises(ValueError, match="n_bins"):
        ece.compute(probabilities=[[0.6, 0.4]], references=[0], n_bins=0)


def test_metrics_load_offline_by_path_in_a_fresh_process(tmp_path):
    """No Hub and an empty modules cache: the repo's modules still load and compute; the Hub name does not."""
    script = textwrap.dedent(
        """
        import evaluate
        from emovlm_kd.metrics import METRIC_NAMES, load_metric
        for name in METRIC_NAMES:
            kwargs = {"probabilities": [[0.7, 0.3]]} if name == "ece" else {"predictions": [0]}
            print(name, load_metric(name).compute(references=[0], **kwargs)[name if name != "ece" else "ece"])
        try:
            evaluate.load("accuracy")
        except Exception as error:
            print("hub refused:", type(error).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["accuracy"] == "1.0" and lines["macro_f1"] == "1.0"
    assert lines["confusion_matrix"] == "[[1]]" and lines["per_class_accuracy"] == "[1.0]"
    assert float(lines["ece"]) == pytest.approx(0.3)
    assert lines["hub"].startswith("refused")
