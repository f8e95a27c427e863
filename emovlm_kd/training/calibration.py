"""Temperature scaling (Guo et al., 2017) after stage 4: one scalar per output, fitted on the val split.

The gate is trained with cross-entropy on probability vectors and comes out badly calibrated (its raw softmax was
0.5 ECE on held-out data where the head's was 0.05). Dividing its logits by a temperature T fitted to minimise the
negative log-likelihood on val fixes the confidence without moving any argmax (accuracy unchanged). The head gets
its own T for its reported `distill_logits`; the gate keeps reading the head's raw probabilities, as it was trained.
The temperatures are saved in the bundle's config (`gate_calibration_temperature`, `head_calibration_temperature`)
and applied by the model's outputs (so by the pipeline, `predict` and `evaluate` too).

    T = fit_temperature(val_logits, val_labels)    # pure: float64, deterministic, no autograd
"""

import logging
import math

import torch

logger = logging.getLogger(__name__)

GOLDEN = (5**0.5 - 1) / 2  # 0.618...
BOUNDS = (1e-2, 1e2)  # the temperatures searched: a gate on probability vectors may need T well below 1


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


def calibrate_bundle(settings, bundle, passes, outputs):
    """Fit the gate's and the head's temperatures on the val split and store them in `bundle.config` (`settings`:
    stage 4's `GateArguments`, whose `gate_data` says whether the gate trained on val).

    `passes` / `outputs` are the runner's per-split cached tensors (labels) and stage 3-4 outputs (`head_logits`,
    `head_probs`, `vlm_scores`). Without a val split the temperatures stay 1.0. Returns
    `{"gate": {...}, "head": {...}}` with each temperature and the val NLL before and after.
    """
    from emovlm_kd.training.heads import gate_outputs

    if "val" not in passes or len(passes["val"]["labels"]) == 0:
        logger.warning("calibration: no val split, the temperatures stay 1.0")
        return {}
    if settings.gate_data == "val":
        # the consequence of a setting chosen on purpose (the demo's: its val split is its only held-out data), not
        # a problem: a line at INFO, not a warning (`--quiet` shows only what the user can act on)
        logger.info("calibration: the gate trained on val, so its temperature is fitted on its own training data "
                    "(likely too confident; --gate-data sampled or train keeps val held out)")
    labels, val = passes["val"]["labels"], outputs["val"]
    logits = {"gate": gate_outputs(bundle.gate, val["vlm_scores"], val["head_probs"]), "head": val["head_logits"]}
    record = {}
    for name, part_logits in logits.items():
        temperature = fit_temperature(part_logits, labels)
        setattr(bundle.config, f"{name}_calibration_temperature", temperature)
        record[name] = {"temperature": temperature, "val_nll_before": nll(part_logits, labels),
                        "val_nll_after": nll(part_logits, labels, temperature)}
        logger.info("calibration: %s temperature %.4f (val NLL %.4f -> %.4f, %d images)", name, temperature,
                    record[name]["val_nll_before"], record[name]["val_nll_after"], len(labels))
    bundle.config.validate()
    return record
