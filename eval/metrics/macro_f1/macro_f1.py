"""Macro-averaged F1: the unweighted mean over classes of each class's F1 (a metric module loaded offline by path).

Computed with numpy; equal to scikit-learn's `f1_score(average="macro", zero_division=0)`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Macro F1 = mean over classes c of F1_c = 2 * TP_c / (2 * TP_c + FP_c + FN_c). By default the classes are those "
    "that occur in the references or the predictions (as scikit-learn does); `labels` fixes the list instead."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    labels (`list[int]`, *optional*): the classes to average over (default: those in references or predictions).
    zero_division (`float`, defaults to 0.0): F1 of a class with no reference and no prediction among `labels`.
Returns:
    macro_f1 (`float`): in [0, 1].
    f1_per_class (`list[float]`): F1 of each class in `labels` order (sorted class ids by default).
    labels (`list[int]`): the classes averaged over.
Examples:
    >>> load_metric("macro_f1").compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1])["macro_f1"]
    0.7333333333333334
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, zero_division=0.0):
        predictions, references = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("macro F1 of zero samples is undefined")
        if labels is None:
            labels = np.union1d(predictions, references)
        labels = [int(c) for c in labels]
        scores = []
        for c in labels:
            tp = int(((predictions == c) & (references == c)).sum())
            fp = int(((predictions == c) & (references != c)).sum())
            fn = int(((predictions != c) & (references == c)).sum())
            denominator = 2 * tp + fp + fn
            scores.append(2 * tp / denominator if denominator else float(zero_division))
        return {"macro_f1": float(np.mean(scores)), "f1_per_class": scores, "labels": labels}
