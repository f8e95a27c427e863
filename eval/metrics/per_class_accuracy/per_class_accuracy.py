"""Per-class accuracy (recall): for each true class, the fraction of its samples predicted correctly.

A metric module loaded offline by path.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Per-class accuracy of class c = (samples of class c predicted as c) / (samples of class c)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    num_classes (`int`, *optional*): classes 0..num_classes-1 (default: 1 + the largest id seen).
Returns:
    per_class_accuracy (`list[float | None]`): one entry per class; `None` for a class with no reference sample.
    support (`list[int]`): the number of reference samples of each class.
Examples:
    >>> load_metric("per_class_accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], num_classes=4)
    {'per_class_accuracy': [1.0, 1.0, 0.5, None], 'support': [1, 1, 2, 0]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerClassAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions, references = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        if num_classes is None:
            num_classes = int(max(predictions.max(initial=-1), references.max(initial=-1))) + 1
        support = np.bincount(references, minlength=num_classes)[:num_classes]
        correct = np.bincount(references[predictions == references], minlength=num_classes)[:num_classes]
        accuracy = [float(c / s) if s else None for c, s in zip(correct, support)]
        return {"per_class_accuracy": accuracy, "support": [int(s) for s in support]}
