"""Temperature scaling (Guo et al., 2017) after stage 4: one scalar per output, fitted on val images the calibrated
part never trained on.

The gate is trained with cross-entropy on probability vectors and comes out badly calibrated (its raw softmax was
0.5 ECE on held-out data where the head's was 0.05). Dividing its logits by a temperature T fitted to minimise the
negative log-likelihood on held-out images fixes the confidence without moving any argmax (accuracy unchanged). The
head (trained on train) gets its own T, fitted on val, for its reported `distill_logits`; the gate keeps reading the
head's raw probabilities, as it was trained. The gate's T is fitted on val too, or, when the gate trains on val
(`--gate-data val`, the demo's), on a stratified, seeded half of val kept out of the gate's training
(`calibration_rows`). A fit on images the part trained on, or on images it classifies all right, has no minimum
(T -> 0: scores of 0 and 1); a temperature at a search bound is therefore an error in the results
(`eval_results.json`, the model card, a warning), and the part is left uncalibrated (T = 1), not floored.
The temperatures are saved in the bundle's config (`gate_calibration_temperature`, `head_calibration_temperature`)
and applied by the model's outputs (so by the pipeline, `predict` and `evaluate` too).

    T = fit_temperature(val_logits, val_labels)    # pure: float64, deterministic, no autograd
    gate_rows, calibration = calibration_rows(cfg.gate_data, val_labels, cfg.seed)
"""

import logging
import math

import torch

logger = logging.getLogger(__name__)

GOLDEN = (5**0.5 - 1) / 2  # 0.618...
BOUNDS = (1e-2, 1e2)  # the temperatures searched: a gate on probability vectors may need T well below 1
CALIBRATION_SHARE = 0.5  # of val, kept out of the gate's training to fit its temperature when the gate trains on val


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of `labels` (N,) under `softmax(logits / temperature)` (N, C), in float64."""
    logits = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long)))


def fit_temperature(logits, labels, bounds=BOUNDS, tolerance=1e-6):
    """The temperature T in `bounds` that minimises `nll(logits, labels, T)`, by golden-section search over log T.

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), hence unimodal in log T: the
    search finds the minimum to `tolerance` (relative) in about 50 evaluations. Where the NLL keeps falling towards
    a bound (e.g. val samples all right and T -> 0), the bound is returned. Empty inputs raise `ValueError`.
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need (N, C) logits and (N,) labels with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be 0 < low < high, got {bounds}")
    low, high = math.log(bounds[0]), math.log(bounds[1])

    def loss(log_t):
        return nll(logits, labels, math.exp(log_t))

    a, b = low + (1 - GOLDEN) * (high - low), low + GOLDEN * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > tolerance:
        if loss_a <= loss_b:  # the minimum lies in [low, b]
            high, b, loss_b = b, a, loss_a
            a = low + (1 - GOLDEN) * (high - low)
            loss_a = loss(a)
        else:  # in [a, high]
            low, a, loss_a = a, b, loss_b
            b = low + GOLDEN * (high - low)
            loss_b = loss(b)
    best = min((loss(low), low), (loss_a, a), (loss_b, b), (loss(high), high))[1]
    return math.exp(best)


def at_bound(temperature, bounds=BOUNDS):
    """Whether a fitted temperature sits at a bound of the search: the NLL kept falling towards it, so the fit
    found no minimum (e.g. every calibration image classified right: T -> 0) and T is not a calibration."""
    return any(math.isclose(temperature, bound, rel_tol=1e-4) for bound in bounds)


def calibration_rows(gate_data, val_labels, seed):
    """`(gate_rows, calibration_rows)`: the val rows the gate trains on (None: the gate does not train on val) and
    the val rows the gate's temperature is fitted on, both sorted.

    When the gate trains on val (`--gate-data val`), a stratified, seeded share `CALIBRATION_SHARE` of val is kept
    out of its training (`emovlm_kd.data.splits.stratified_split`: each class with two images or more gives at
    least one to each side); otherwise the gate never saw val and every val row calibrates it.
    """
    from emovlm_kd.data.splits import stratified_split

    labels = [int(label) for label in val_labels]
    if gate_data != "val":
        return None, list(range(len(labels)))
    if len(labels) < 2:
        return list(range(len(labels))), []
    return stratified_split(labels, CALIBRATION_SHARE, seed)


def fit_part(name, logits, labels, fitted_on):
    """One part's temperature and its record: `{"temperature", "fitted_on", "images", "val_nll_before",
    "val_nll_after", "error"}`. A fit that finds no minimum (the temperature at a bound) or has no image to fit on
    leaves the part uncalibrated (T = 1.0) with `error` saying why; it is logged as a warning."""
    record = {"fitted_on": fitted_on, "images": int(len(labels)), "error": None}
    if len(labels) == 0:
        record.update(temperature=1.0, error="no image to fit the temperature on: left at 1.0 (uncalibrated)")
    else:
        temperature = fit_temperature(logits, labels)
        record.update(fitted=temperature, val_nll_before=nll(logits, labels), val_nll_after=nll(logits, labels,
                                                                                               temperature))
        if at_bound(temperature):
            errors = int((torch.as_tensor(logits).argmax(-1) != torch.as_tensor(labels)).sum())
            record.update(temperature=1.0, error=(
                f"the fitted temperature {temperature:g} sits at a bound of {BOUNDS}: the NLL on the {len(labels)} "
                f"images ({errors} misclassified) has no minimum inside, so temperature scaling is not identifiable "
                "there; left at 1.0 (uncalibrated)"))
        else:
            record["temperature"] = temperature
    if record["error"]:
        logger.warning("calibration: %s: %s", name, record["error"])
    else:
        logger.info("calibration: %s temperature %.4f on %s (NLL %.4f -> %.4f, %d images)", name,
                    record["temperature"], fitted_on, record["val_nll_before"], record["val_nll_after"], len(labels))
    return record


def calibrate_bundle(bundle, passes, outputs, rows, val_ids=None, seed=None):
    """Fit the gate's and the head's temperatures on val images each never trained on; store them in `bundle.config`
    (`seed`: the run's, which drew the calibration rows).

    `passes` / `outputs` are the runner's per-split cached tensors (labels) and stage 3-4 outputs (`head_logits`,
    `head_probs`, `vlm_scores`); `rows`: `calibration_rows`' pair. The head (trained on train) is fitted on all of
    val, the gate on the calibration rows. Without a val split the temperatures stay 1.0. Returns
    `{"gate": {...}, "head": {...}}` (see `fit_part`), with the calibration rows' ids (`val_ids`, else their
    indices) under `"gate"` when the gate trained on the rest of val.
    """
    from emovlm_kd.training.heads import gate_outputs

    if "val" not in passes or len(passes["val"]["labels"]) == 0:
        logger.warning("calibration: no val split, the temperatures stay 1.0")
        return {}
    gate_rows, calibration = rows
    labels, val = passes["val"]["labels"], outputs["val"]
    index = torch.as_tensor(calibration, dtype=torch.long)
    gate_logits = gate_outputs(bundle.gate, val["vlm_scores"][index], val["head_probs"][index])
    gate_fitted_on = "val" if gate_rows is None else (
        f"val's calibration part ({len(calibration)} of {len(labels)} images, stratified, seed {seed}; the gate "
        f"trained on the other {len(gate_rows)})")
    record = {"gate": fit_part("gate", gate_logits, labels[index], gate_fitted_on),
              "head": fit_part("head", val["head_logits"], labels, "val (the head trained on train)")}
    if gate_rows is not None:
        record["gate"]["ids"] = [str(val_ids[i]) for i in calibration] if val_ids is not None else list(calibration)
    for name, part in record.items():
        setattr(bundle.config, f"{name}_calibration_temperature", part["temperature"])
    bundle.config.validate()
    return record


def test_calibration(record, labels, logits, n_bins=15):
    """`record` with each part's ECE on the test split before and after its temperature (`test_ece_before`,
    `test_ece_after`), its numbers rounded to 4 decimals for RUN/eval_results.json (the config keeps the exact
    temperatures): `logits` is `{"gate": (N, C), "head": (N, C)}` of the test images, `labels` (N,)."""
    from emovlm_kd.metrics import load_metric

    ece = load_metric("ece")
    references = torch.as_tensor(labels).numpy()

    def measure(part_logits, temperature):
        probs = (torch.as_tensor(part_logits, dtype=torch.float64) / temperature).softmax(-1).numpy()
        return round(float(ece.compute(probabilities=probs, references=references, n_bins=n_bins)["ece"]), 4)

    for name, part in record.items():
        part.update(test_ece_before=measure(logits[name], 1.0), test_ece_after=measure(logits[name],
                                                                                        part["temperature"]))
        for key in ("temperature", "fitted", "val_nll_before", "val_nll_after"):  # 4 decimals, as the accuracies
            if key in part:
                part[key] = round(part[key], 4)
    return record
