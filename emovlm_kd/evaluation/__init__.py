"""Evaluation: batched inference over a split, the report (metrics, complementarity, ECE), plots, Table 1."""
