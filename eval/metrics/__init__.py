"""Metric modules kept in the repo (`<name>/<name>.py`, each an `evaluate.Metric`), loaded offline by path.

    from emovlm_kd.metrics import load_metric
    load_metric("macro_f1").compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"macro_f1": 0.666...}

`evaluate.load("accuracy")` needs the Hub; `evaluate.load(<folder>)` does not. This folder is installed as the
package `emovlm_kd.metrics` (setup.py maps it there), so a wheel ships the modules with the library.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix", "ece")


def metric_path(name):
    """The folder of the metric module `name` (it holds `<name>.py`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")
    return METRICS_DIR / name


def load_metric(name, **kwargs):
    """`evaluate.load` of the repo's metric module `name`, kept in memory (no cache files, no Hub)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric", "metric_path"]
