"""emovlm_kd.evaluation.stats: McNemar's test against published worked examples, the bootstrap interval against
its definition, and the pairing of two runs' predictions."""

import math

import numpy as np
import pytest

from emovlm_kd.evaluation.stats import bootstrap_ci, mcnemar, paired_correctness


def _pairs(both, a_only, b_only, neither):
    """Correctness vectors with the given 2x2 counts (shuffled: the test must not depend on the order)."""
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    order = np.random.default_rng(0).permutation(len(a))
    return np.array(a, dtype=bool)[order], np.array(b, dtype=bool)[order]


def test_mcnemar_exact_small_discordant_counts():
    # Worked example of the death-penalty survey (20 teenagers; 11 changed from in favour to against, 3 the other
    # way): two-tailed exact probability 0.057373046875 (calcugator's chi2_mcnemar tutorial), which is
    # 2 * P(X <= 3 | X ~ Bin(14, 1/2)) = 2 * (1 + 14 + 91 + 364) / 2**14.
    a, b = _pairs(both=1, a_only=11, b_only=3, neither=5)
    result = mcnemar(a, b)
    assert (result.b, result.c, result.method) == (11, 3, "exact")
    assert result.statistic == 3
    assert result.p_value == pytest.approx(2 * (1 + 14 + 91 + 364) / 2**14, rel=1e-12)
    # The test is symmetric in its two classifiers.
    swapped = mcnemar(b, a)
    assert (swapped.b, swapped.c) == (3, 11) and swapped.p_value == pytest.approx(result.p_value, rel=1e-12)


def test_mcnemar_chi_square_with_continuity_correction():
    # Agresti, An Introduction to Categorical Data Analysis (2nd ed., 2007), Table 8.1: presidential approval of
    # 1600 people in two surveys; 150 approve -> disapprove, 86 disapprove -> approve; Agresti gives
    # z = (86 - 150) / sqrt(86 + 150) = -4.17 without correction. With Edwards' correction the statistic is
    # (|150 - 86| - 1)^2 / 236 = 3969 / 236, and for 1 degree of freedom P(chi2 > x) = erfc(sqrt(x / 2)).
    a, b = _pairs(both=794, a_only=150, b_only=86, neither=570)
    result = mcnemar(a, b)
    assert (result.b, result.c, result.method) == (150, 86, "chi2")
    assert abs(150 - 86) / math.sqrt(236) == pytest.approx(4.17, abs=0.005)
    assert result.statistic == pytest.approx(3969 / 236, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(3969 / 236 / 2)), rel=1e-9)


def test_mcnemar_switches_to_chi_square_at_25_discordant_images():
    assert mcnemar(*_pairs(0, 12, 12, 3)).method == "exact"  # b + c = 24
    at_25 = mcnemar(*_pairs(0, 13, 12, 3))
    assert at_25.method == "chi2" and at_25.statistic == 0.0 and at_25.p_value == 1.0


def test_mcnemar_without_discordant_images_and_bad_input():
    result = mcnemar([True, False, True], [True, False, True])
    assert (result.b, result.c, result.p_value) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        mcnemar([2, 0], [1, 0])


def test_bootstrap_ci_is_the_percentile_interval_and_seeded():
    correct = np.random.default_rng(3).random(400) < 0.7
    low, high = bootstrap_ci(correct, resamples=2000, seed=5)
    assert bootstrap_ci(correct, resamples=2000, seed=5) == (low, high)  # seeded: reproducible
    # The definition, by hand: resample the images with replacement, take the 2.5th and 97.5th percentiles.
    rng = np.random.default_rng(11)
    accuracies = correct[rng.integers(0, correct.size, size=(20000, correct.size))].mean(axis=1) * 100
    expected = np.percentile(accuracies, [2.5, 97.5])
    assert low == pytest.approx(expected[0], abs=0.6) and high == pytest.approx(expected[1], abs=0.6)
    assert low < 100 * correct.mean() < high
    # The normal approximation agrees for n = 400: half-width ~ 1.96 * sqrt(p (1 - p) / n).
    half = 1.96 * math.sqrt(correct.mean() * (1 - correct.mean()) / correct.size) * 100
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    # A higher confidence gives a wider interval.
    low99, high99 = bootstrap_ci(correct, confidence=0.99, resamples=2000, seed=5)
    assert low99 < low and high99 > high


def test_bootstrap_ci_degenerate_and_empty():
    assert bootstrap_ci([True] * 7) == (100.0, 100.0)
    assert bootstrap_ci([False] * 7) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no images"):
        bootstrap_ci([])


def _records(predicted, labels, ids):
    return [{"id": i, "label": y, "predictions": {"emovlm_kd": p, "vlm": None}}
            for i, p, y in zip(ids, predicted, labels)]


def test_paired_correctness_aligns_two_runs_by_image_id():
    run_a = _records(["joy", "fear", "sad"], ["joy", "sad", "sad"], ["x", "y", "z"])
    run_b = _records(["sad", "fear", "sad"], ["sad", "joy", "sad"], ["z", "x", "y"])  # other order
    a, b, ids = paired_correctness(run_a, run_b)
    assert ids == ["x", "y", "z"]
    assert a.tolist() == [True, False, True] and b.tolist() == [False, True, True]
    vlm, _, _ = paired_correctness(run_a, run_b, "vlm", "emovlm_kd")
    assert vlm.tolist() == [False, False, False]  # no answer is wrong
    with pytest.raises(ValueError, match="different images"):
        paired_correctness(run_a, run_b[:2])
    relabelled = _records(["sad", "joy", "sad"], ["sad", "joy", "joy"], ["z", "x", "y"])
    with pytest.raises(ValueError, match="different true labels"):
        paired_correctness(run_a, relabelled)
