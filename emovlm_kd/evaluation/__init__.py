"""Evaluation: batched inference over a split (`runner`), the report (`report`: metrics, complementarity, ECE),
plots, Table 1 (`table1`), the ablations (`ablations`, rendered by `ablation_tables`), the paper's numbers (`paper`)
and the flags the evaluation commands share (`options`)."""
