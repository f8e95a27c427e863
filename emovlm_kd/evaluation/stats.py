"""Statistics for the reports: a bootstrap confidence interval of an accuracy and McNemar's paired test.

Both take per-image correctness (a boolean per test image, `True` = the prediction equals the true label): the
interval resamples the test images; McNemar compares two classifiers on the SAME images (two branches of one run,
or two runs paired image by image with `paired_correctness`).

Library code does the arithmetic: `scipy.stats.bootstrap` (the function `evaluate`'s evaluator calls for its
"bootstrap" strategy, evaluate/evaluator/base.py) and `scipy.stats.binomtest` / `scipy.stats.chi2`.
"""

from dataclasses import dataclass

import numpy as np

BATCH_ELEMENTS = 4_000_000  # bootstrap resamples drawn at once: about 32 MB of float64, whatever the test set's size
EXACT_BELOW = 25  # McNemar: the exact binomial test when b + c < 25 (the usual rule; see `mcnemar`)


def _correct_vector(correct, name="correct"):
    values = np.asarray(correct)
    if values.ndim != 1:
        raise ValueError(f"{name} must be one boolean per image, got shape {values.shape}")
    if values.size and not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must hold booleans (or 0/1)")
    return values.astype(bool)


def bootstrap_ci(correct, confidence=0.95, resamples=10000, seed=0) -> tuple[float, float]:
    """The percentile bootstrap confidence interval of the accuracy, in %: `(low, high)`.

    `correct`: one boolean per test image. The images are resampled with replacement `resamples` times (seeded,
    so the interval is reproducible) and the interval is the (1 - confidence) / 2 and (1 + confidence) / 2
    percentiles of the resampled accuracies (Efron & Tibshirani 1993, An Introduction to the Bootstrap, ch. 13).
    """
    from scipy.stats import bootstrap  # scipy is imported when a report is built, not when this module is

    values = _correct_vector(correct).astype(np.float64)
    if values.size == 0:
        raise ValueError("no images: a confidence interval needs at least one")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if values.min() == values.max():  # every resample has the same accuracy; scipy would warn about the spread
        return float(100 * values[0]), float(100 * values[0])
    result = bootstrap(
        (values,), np.mean, n_resamples=int(resamples), confidence_level=confidence, method="percentile",
        vectorized=True, batch=max(1, BATCH_ELEMENTS // values.size), rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(100 * low), float(100 * high)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test of two classifiers on the same images.

    b: images only the first got right; c: images only the second got right (the discordant pairs; the images
    both or neither got right carry no information on the difference). statistic: `min(b, c)` for the exact
    test, the continuity-corrected chi-square for the asymptotic one. p_value: two-sided. method: "exact" or
    "chi2".
    """

    b: int
    c: int
    statistic: float
    p_value: float
    method: str

    def as_dict(self):
        return {"b": self.b, "c": self.c, "statistic": self.statistic, "p_value": self.p_value,
                "method": self.method}


def mcnemar(a_correct, b_correct) -> McNemarResult:
    """McNemar's test (McNemar 1947, Psychometrika 12:153-157) of H0: both classifiers are right equally often.

    With b + c < 25 the exact test: b ~ Binomial(b + c, 1/2) under H0, two-sided p from `scipy.stats.binomtest`
    (statistic min(b, c)). Otherwise the chi-square test with Edwards' continuity correction,
    (|b - c| - 1)^2 / (b + c) on 1 degree of freedom. The b + c < 25 rule and both formulas: Agresti (2013),
    Categorical Data Analysis, 3rd ed., sec. 11.1; they are also what statsmodels' `mcnemar(exact=...,
    correction=True)` computes.
    """
    from scipy.stats import binomtest, chi2

    a, b_ = _correct_vector(a_correct, "a_correct"), _correct_vector(b_correct, "b_correct")
    if a.shape != b_.shape:
        raise ValueError(f"the two correctness vectors differ in length: {a.size} vs {b_.size}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n = b + c
    if n == 0:  # no discordant image: no evidence of any difference
        return McNemarResult(b, c, 0.0, 1.0, "exact")
    if n < EXACT_BELOW:
        p = binomtest(min(b, c), n, 0.5, alternative="two-sided").pvalue
        return McNemarResult(b, c, float(min(b, c)), float(min(p, 1.0)), "exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemarResult(b, c, float(statistic), float(chi2.sf(statistic, 1)), "chi2")


def correctness_by_id(records, part):
    """`{image id: part right?}` from prediction records (the lines of `predictions.jsonl`: `id`, `label`,
    `predictions[part]`, None = no answer = wrong)."""
    out = {}
    for record in records:
        if part not in record["predictions"]:
            raise ValueError(f"record {record['id']!r} has no prediction of {part!r}")
        if record["id"] in out:
            raise ValueError(f"image id {record['id']!r} appears twice")
        out[record["id"]] = record["predictions"][part] == record["label"]
    return out


def paired_correctness(records_a, records_b, part_a="emovlm_kd", part_b=None):
    """Two runs' correctness on the same images, aligned by image id: `(a_correct, b_correct, ids)`, ready for
    `mcnemar` and `bootstrap_ci`.

    records_a, records_b: prediction records of two runs (e.g. two protocols' `predictions.jsonl`); part_a,
    part_b: which part of each (part_b defaults to part_a). The two runs must cover the same images with the same
    true labels; otherwise the pairing would be meaningless and this raises ValueError naming the difference.
    """
    records_a, records_b = list(records_a), list(records_b)
    a, b = correctness_by_id(records_a, part_a), correctness_by_id(records_b, part_b or part_a)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the runs cover different images: {len(only_a)} only in the first (e.g. {only_a[:3]}), "
                         f"{len(only_b)} only in the second (e.g. {only_b[:3]})")
    labels_b = {r["id"]: r["label"] for r in records_b}
    differing = [r["id"] for r in records_a if r["label"] != labels_b[r["id"]]]
    if differing:
        raise ValueError(f"{len(differing)} images have different true labels in the two runs (e.g. {differing[:3]})")
    ids = [r["id"] for r in records_a]
    return np.array([a[i] for i in ids]), np.array([b[i] for i in ids]), ids


__all__ = ["McNemarResult", "bootstrap_ci", "correctness_by_id", "mcnemar", "paired_correctness"]
