"""Confusion matrix: counts of (true class, predicted class) pairs (a metric module loaded offline by path)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "matrix[i][j] = number of samples whose reference is class i and whose prediction is class j."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    num_classes (`int`, *optional*): the matrix is num_classes x num_classes (default: 1 + the largest id seen).
Returns:
    confusion_matrix (`list[list[int]]`): rows are true classes, columns predicted classes.
Examples:
    >>> load_metric("confusion_matrix").compute(predictions=[0, 1, 1], references=[0, 0, 1])
    {'confusion_matrix': [[1, 1], [0, 1]]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConfusionMatrix(evaluate.Metric):
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
        if predictions.size and (min(predictions.min(), references.min()) < 0 or
                                 max(predictions.max(), references.max()) >= num_classes):
            raise ValueError(f"class ids must lie in [0, {num_classes})")
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (references, predictions), 1)
        return {"confusion_matrix": matrix.tolist()}
