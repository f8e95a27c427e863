"""Evaluation of EmoVLM-KD models: metric modules kept in the repo, the `evaluate` and `table1` commands.

    emovlm-kd evaluate --model DIR --dataset DATA --output-dir R    report.json, predictions.jsonl, plots, report.md
    emovlm-kd table1 --model DIR --data-root ROOT --output-dir R    the paper's Table 1 row for the model

The pure aggregation lives in `eval.report`, inference in `eval.runner`, plots in `eval.plots`.
"""
