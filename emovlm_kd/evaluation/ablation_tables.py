"""The Markdown of the ablation tables (Table 3: head depth, Figure 3: alpha, Table 4: gate type, and the gate's
training data): the run's settings, one row per setting beside the paper's numbers, and whether the run's own row
reproduces the run."""

from collections.abc import Callable
from dataclasses import dataclass

from emovlm_kd.evaluation.paper import GATE_TITLES


@dataclass(frozen=True)
class Layout:
    """How one ablation's table reads: its title, columns, row cells, compared parts and closing notes."""

    title: str
    header: Callable  # table -> column titles
    cells: Callable  # row -> cells
    parts: tuple  # the accuracies compared with RUN/eval_results.json
    notes: Callable  # table -> closing lines


def render_table(table):
    """The Markdown of an ablation table (`table["ablation"]`: head_depth, alpha or gate)."""
    layout = LAYOUTS[table["ablation"]]
    lines = _intro(table, layout.title)
    lines += _grid(layout.header(table), [layout.cells(row) for row in table["rows"]])
    lines += _outro(table, layout.parts)
    lines += layout.notes(table)
    return "\n".join(lines) + "\n"


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value):
    return "-" if value is None else f"{value:.2f}"


def _mark(text, row):
    """`text`, marked `(run)` on the row with the run's own settings."""
    return text + (" (run)" if row["run_setting"] else "")


def _grid(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _intro(table, title):
    s = table["settings"]
    run = f"Run `{table['run']}`, {table['num_samples']} test images, seed {s['seed']}, {s['dtype']}."
    lines = [f"# {title}", "", run]
    if "alpha" in s or "tau" in s:
        lines.append(f"Head: alpha {s.get('alpha', 'swept')}, tau {s['tau']}, dropout {s['head_dropout']}, "
                     f"{s['distill_epochs']:g} epochs at lr {s['distill_lr']:g}.")
    lines.append(f"Gate: {s.get('gate_type', 'swept')}, {s['vlm_vector']} VLM vectors, {s['gate_epochs']:g} epochs "
                 f"at lr {s['gate_lr']:g}, trained on {_gate_data_text(s)}.")
    branches = ", ".join(f"{name} {_pct(acc)} %" for name, acc in table["branches"].items())
    lines.append(f"Branches on test: {branches}.")
    if "head" in s:  # the gate ablation trains on the run's saved head
        lines.append(f"Head: the run's trained head, `{s['head']}`.")
    return lines + [""]


def _gate_data_text(s):
    data = s.get("gate_data")
    if data == "swept":
        return "the data of each row"
    if data == "sampled":
        return f"{s['gate_samples']} answers per train image sampled at T={s['gate_temperature']:g}"
    return f"the VLM's {s['gate_train_split']} vectors"


def _outro(table, parts):
    verdict = {True: "yes", False: "NO", None: "no such row or no eval_results.json"}[table["reproduces_run"]]
    lines = ["", "(run): the run's own settings."]
    if table["run_results"]:
        found = ", ".join(f"{p} {_pct(table['run_results'].get(p))} %" for p in parts)
        lines.append(f"RUN/eval_results.json: {found}; reproduced by the (run) row: {verdict}.")
    return lines


def _head_depth_cells(r):
    paper = r["paper"] or {}
    return [_mark(str(r["head_hidden_sizes"]), r), f"{r['head_parameters']:,}", _pct(r["accuracy"]["distill"]),
            _pct(r["accuracy"]["emovlm_kd"]), _num(paper.get("fi")), _num(paper.get("emotion6"))]


def _alpha_cells(r):
    return [_mark(f"{r['alpha']:g}", r), _pct(r["accuracy"]["distill"]), _pct(r["accuracy"]["emovlm_kd"]),
            f"{r['kl_teacher_head']:.4f}", f"{r['kl_teacher_head_at_tau']:.4f}"]


def _gate_cells(r):
    return [_mark(GATE_TITLES[r["gate_type"]], r), f"{r['gate_parameters']:,}", _pct(r["accuracy"]["emovlm_kd"]),
            _num(r["paper"]["fi"])]


GATE_DATA_TITLES = {"sampled": "sampled (the paper's)", "val": "val (held out)", "train": "train"}


def _gate_data_cells(r):
    title = _mark(GATE_DATA_TITLES.get(r["gate_data"], r["gate_data"]), r)
    if "unavailable" in r:
        return [title, "-", "-", "-", "-"]
    trained_on = f"{r['images']} {r['split']} images" + (f" x {r['samples_per_image']} answers"
                                                          if r["samples_per_image"] else "")
    f = r["follows_where_branches_differ"]
    follows = f"{_pct(f['vlm'])} / {_pct(f['head'])} of {f['images']}"
    return [title, trained_on, _pct(r["vlm_accuracy_on_gate_data"]), _pct(r["accuracy"]["emovlm_kd"]), follows]


def _gate_data_notes(table):
    lines = [("VLM right there: how often the VLM's answer on the gate's training data is its label (sampled: over "
              "every answer; one naming no label counts as wrong)."),
             ("Follows: on the test images where the VLM and the head answer differently, the share where EmoVLM-KD "
              "answers as the VLM / as the head."),
             f"Paper: {table['paper_reference']}."]
    return lines + [f"{GATE_DATA_TITLES.get(r['gate_data'], r['gate_data'])}: not available, {r['unavailable']}"
                    for r in table["rows"] if "unavailable" in r]


LAYOUTS = {
    "head_depth": Layout(
        title="Table 3: head depth (test accuracy, %)",
        header=lambda table: ["Head", "Head parameters", "Distill head", "EmoVLM-KD", "Paper FI", "Paper Emotion6"],
        cells=_head_depth_cells,
        parts=("distill", "emovlm_kd"),
        notes=lambda table: [
            "Paper: EmoVLM-KD accuracy with Qwen2-VL-7B (Table 3); '-' where the paper has no such head."
        ],
    ),
    "alpha": Layout(
        title="Figure 3: alpha (test accuracy, %, and KL(teacher || head))",
        header=lambda table: ["alpha", "Distill head", "EmoVLM-KD", "KL at T=1",
                              f"KL at T={table['settings']['tau']:g}"],
        cells=_alpha_cells,
        parts=("distill", "emovlm_kd"),
        notes=lambda table: ["KL: mean over test images of KL(p_teacher || p_head) at temperature T (no T^2 factor).",
                             f"Paper: {table['paper']}."],
    ),
    "gate": Layout(
        title="Table 4: gate type (EmoVLM-KD test accuracy, %)",
        header=lambda table: ["Gate", "Gate parameters", "EmoVLM-KD", "Paper FI"],
        cells=_gate_cells,
        parts=("emovlm_kd",),
        notes=lambda table: ["Paper: EmoVLM-KD accuracy on FI with Qwen2-VL-7B (Table 4)."],
    ),
    "gate_data": Layout(
        title="Gate data: what the gate trains on (EmoVLM-KD test accuracy, %)",
        header=lambda table: ["Gate data", "Trained on", "VLM right there", "EmoVLM-KD",
                              "Follows VLM / head where they differ (%)"],
        cells=_gate_data_cells,
        parts=("emovlm_kd",),
        notes=_gate_data_notes,
    ),
}
