"""The report's figures: confusion matrices and the complementarity chart (the paper's Figure 1), from the report."""

import logging

from .report import PART_TITLES, atomic_write

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import, so that importing eval never changes a backend
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    plt = _pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), mode="wb")
    finally:
        plt.close(fig)
    return path


def plot_confusion_matrices(report, path):
    """One row-normalised confusion matrix per part (counts written in the cells), side by side."""
    plt = _pyplot()
    labels = report["labels"]
    parts = list(report["confusion_matrix"])
    size = max(3.5, 0.55 * len(labels) + 1.5)
    fig, axes = plt.subplots(1, len(parts), figsize=(size * len(parts), size), squeeze=False)
    for ax, part in zip(axes[0], parts):
        matrix = report["confusion_matrix"][part]
        rates = [[count / max(1, sum(row)) for count in row] for row in matrix]
        ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"{PART_TITLES[part]}: {100 * report['accuracy'][part]:.1f}%")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    colour = "white" if rates[i][j] > 0.5 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=colour)
    fig.tight_layout()
    return _save(fig, path)


def plot_complementarity(report, path):
    """Stacked bars per pair of parts (both correct / only one / neither), as in the paper's Figure 1, each segment
    labelled with its count and each pair's two "only" segments named under its bar; a second panel shows, where the
    VLM and the head disagree, which branch the gate followed and who was right, with counts. None if no pair."""
    pairs = report.get("complementarity") or {}
    if not pairs:
        logger.info("no pair of parts to compare: %s not written", path)
        return None
    plt = _pyplot()
    gate = report.get("gate")
    fig, axes = plt.subplots(1, 2 if gate else 1, figsize=(12 if gate else 7, 1.1 * len(pairs) + 1.8), squeeze=False)
    _pair_bars(axes[0][0], pairs, report["num_samples"])
    if gate:
        _gate_bars(axes[0][1], gate)
    fig.tight_layout()
    return _save(fig, path)


PAIR_COLOURS = ("#4c9a5b", "#4a78b5", "#e0a040", "#b0b0b0")


def _pair_bars(ax, pairs, num):
    names = []
    for y, (pair, counts) in enumerate(pairs.items()):
        a, b = pair.split("_vs_")
        segments = [("both correct", counts["both_correct"]), (f"{PART_TITLES[a]} only", counts[f"{a}_only"]),
                    (f"{PART_TITLES[b]} only", counts[f"{b}_only"]), ("neither", counts["neither"])]
        left = 0.0
        for k, (name, count) in enumerate(segments):
            share = 100 * count / num
            ax.barh(y, share, left=left, color=PAIR_COLOURS[k], label=("both correct", "first-named only",
                                                                       "second-named only", "neither")[k] if y == 0
                    else None)
            if share >= 3:
                ax.text(left + share / 2, y, str(count), ha="center", va="center", fontsize=8)
            left += share
        ax.text(0, y + 0.42, f"{segments[1][0]}: {segments[1][1]}   {segments[2][0]}: {segments[2][1]}",
                va="center", fontsize=7)
        names.append(f"{PART_TITLES[a]} vs {PART_TITLES[b]}")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of {num} samples (counts in the bars)")
    ax.set_title("Who is right")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)


def _gate_bars(ax, gate):
    d = gate["disagreements"]
    bars = [("gate followed the VLM", gate["followed_vlm"]), ("gate followed the head", gate["followed_distill"]),
            ("gate chose a third label", gate["followed_neither"]), ("the VLM was right", gate["vlm_correct"]),
            ("the head was right", gate["distill_correct"]), ("the gate was right", gate["gate_correct"])]
    values = [100 * count / d if d else 0.0 for _, count in bars]
    ax.barh(range(len(bars)), values, color=["#4a78b5", "#e0a040", "#b0b0b0", "#4a78b5", "#e0a040", "#4c9a5b"])
    for y, ((_, count), value) in enumerate(zip(bars, values)):
        ax.text(min(value + 1, 80), y, f"{count} ({value:.1f}%)", va="center", fontsize=8)
    ax.axhline(2.5, color="black", linewidth=0.6)
    ax.set_yticks(range(len(bars)), [name for name, _ in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of the {d} images where the VLM and the head disagree")
    ax.set_title("The gate where the VLM and the head disagree")


__all__ = ["plot_complementarity", "plot_confusion_matrices"]
