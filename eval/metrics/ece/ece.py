"""Expected calibration error (ECE) of predicted probabilities (a metric module loaded offline by path).

Guo et al., 2017: split the confidences (the largest probability of each sample) into `n_bins` equal-width bins
(lo, hi] over [0, 1]; ECE = sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|, where a sample is
correct when the argmax of its probabilities (first index on ties) equals its reference.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."

_KWARGS_DESCRIPTION = """
Args:
    probabilities (`list[list[float]]`): one probability vector per sample (rows need not be normalised exactly;
        the confidence is the row's maximum and the prediction its argmax).
    references (`list[int]`): true class ids.
    n_bins (`int`, defaults to 15): equal-width bins over [0, 1]; bin b holds confidences in (b/n, (b+1)/n]
        (a confidence of exactly 0 goes to the first bin).
Returns:
    ece (`float`): in [0, 1].
    bin_counts (`list[int]`), bin_accuracy (`list[float | None]`), bin_confidence (`list[float | None]`): per bin, for
        reliability diagrams (`None` for empty bins).
Examples:
    >>> load_metric("ece").compute(probabilities=[[0.9, 0.1], [0.6, 0.4]], references=[0, 1], n_bins=10)["ece"]
    0.35
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExpectedCalibrationError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "probabilities": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, probabilities, references, n_bins=15):
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        n_bins = int(n_bins)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64)
        if probabilities.ndim != 2 or probabilities.shape[0] != references.shape[0] or probabilities.shape[0] == 0:
            raise ValueError("probabilities must be a non-empty (N, C) array with one reference per row")
        confidence = probabilities.max(axis=1)
        correct = (probabilities.argmax(axis=1) == references).astype(np.float64)
        # bin b holds (edge_b, edge_b+1] with edges = linspace(0, 1, n + 1): the number of inner edges below conf
        inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
        bins = np.searchsorted(inner_edges, confidence, side="left")
        counts = np.bincount(bins, minlength=n_bins)
        sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
        sum_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)
        nonempty = counts > 0
        gaps = np.abs(sum_correct[nonempty] - sum_confidence[nonempty])  # = |B| * |acc - conf|
        ece = float(gaps.sum() / confidence.size)
        return {
            "ece": ece,
            "bin_counts": [int(c) for c in counts],
            "bin_accuracy": [float(s / c) if c else None for s, c in zip(sum_correct, counts)],
            "bin_confidence": [float(s / c) if c else None for s, c in zip(sum_confidence, counts)],
        }
