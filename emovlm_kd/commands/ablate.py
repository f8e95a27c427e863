"""`emovlm-kd ablate`: the paper's ablations, retrained on a finished run's caches in seconds.

    emovlm-kd ablate head-depth --run runs/fi    Table 3: head widths -> distill head and EmoVLM-KD test accuracy
    emovlm-kd ablate alpha --run runs/fi         Figure 3: alpha -> accuracy and KL(teacher || head) on test
    emovlm-kd ablate gate --run runs/fi          Table 4: gate types on the run's trained head -> EmoVLM-KD accuracy
    emovlm-kd ablate gate-data --run runs/fi     the gate on sampled train answers (the paper's), held-out val
                                                 answers and deterministic train answers, side by side

The head and the gate retrain on RUN/cache/ with the run's settings (RUN/train_config.json; flags override), never
loading the VLM or the teacher (see `emovlm_kd.evaluation.ablations`). Each ablation writes `<output-dir>/<name>.json`
and `<name>.md` (default RUN/ablations) and prints the Markdown table. It holds the run folder's lock (RUN/.lock)
meanwhile: with a training run writing in RUN it stops at once, with the message `train` gives.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.paper import GATE_TITLES
from emovlm_kd.settings import REQUIRED, Subcommands, help_field

DEFAULT_DEPTHS = "1024;1024,512;1024,512,256;1024,512,256,128;1024,512,256,128,64"
DEFAULT_ALPHAS = ",".join(f"{i / 10:g}" for i in range(11))
# Flags that override a run setting of the same name.
OVERRIDABLE = ("protocol", "seed", "gate_epochs", "gate_lr", "tau", "head_dropout", "distill_epochs", "distill_lr",
               "gate_type", "alpha", "head_hidden_sizes", "gate_samples")
GATE_DATA = ("sampled", "val", "train")


@dataclass(kw_only=True)
class AblateArguments:
    """What every ablation takes: the run, where the tables go, and the gate's training settings."""

    run: str = help_field("a finished `emovlm-kd train` run folder (RUN)", REQUIRED)
    output_dir: str | None = help_field("where the tables go (default: RUN/ablations)")
    seed: int | None = help_field("seed of initialisation and training (default: run's)")
    gate_epochs: float | None = help_field("gate epochs (default: the run's)")
    gate_lr: float | None = help_field("gate learning rate (default: the run's)")
    protocol: Literal["paper", "official"] | None = help_field(
        "train the head and gate as paper or official (optimiser, batch, initialisation, gate input: "
        "emovlm_kd/protocol.py) on the run's caches (default: the run's)")


@dataclass(kw_only=True)
class GateTypeArguments(AblateArguments):
    gate_type: str | None = help_field("the gate type trained (default: the run's)")


@dataclass(kw_only=True)
class HeadArguments(GateTypeArguments):
    """The ablations that retrain the head: its distillation settings."""

    tau: float | None = help_field("distillation temperature (default: the run's)")
    head_dropout: float | None = help_field("head dropout (default: the run's)")
    distill_epochs: float | None = help_field("distillation epochs (default: the run's)")
    distill_lr: float | None = help_field("distillation learning rate (default: the run's)")


@dataclass(kw_only=True)
class HeadDepthArguments(HeadArguments):
    ablation, _help = "head_depth", "Table 3: head depth"
    _description = "Table 3: retrain the head (and the gate on it) for each head depth"
    depths: str = help_field(f"heads as hidden widths, ';' between heads (default: the paper's, {DEFAULT_DEPTHS})",
                             DEFAULT_DEPTHS)
    alpha: float | None = help_field("weight of the KL term (default: the run's)")

    def values(self):
        return parse_depths(self.depths)


@dataclass(kw_only=True)
class AlphaArguments(HeadArguments):
    ablation, _help = "alpha", "Figure 3: alpha"
    _description = "Figure 3: retrain the head (and the gate on it) for each alpha"
    alphas: str = help_field(f"comma-separated (default: {DEFAULT_ALPHAS})", DEFAULT_ALPHAS)
    head_hidden_sizes: str | None = help_field("head widths, e.g. 1024 (default: the run's)")

    def values(self):
        return parse_alphas(self.alphas)


@dataclass(kw_only=True)
class GateAblationArguments(AblateArguments):
    ablation, _help = "gate", "Table 4: gate type"
    _description = "Table 4: train each gate type on the run's trained head"
    gates: str = help_field("comma-separated gate types (default: all five)", ",".join(GATE_TITLES))

    def values(self):
        return parse_gates(self.gates)


@dataclass(kw_only=True)
class GateDataAblationArguments(GateTypeArguments):
    ablation, _help = "gate_data", "what the gate trains on"
    _description = ("Train the run's gate type on the run's head with each gate-data protocol: sampled train answers "
                    "(cached by a run with --gate-data sampled), held-out val answers, deterministic train answers")
    protocols: str = help_field(f"comma-separated (default: {','.join(GATE_DATA)})", ",".join(GATE_DATA))
    gate_samples: int | None = help_field("sampled answers per image, at most the run's (default: the run's)")

    def values(self):
        return parse_protocols(self.protocols)


ARGUMENTS = Subcommands({"head-depth": HeadDepthArguments, "alpha": AlphaArguments, "gate": GateAblationArguments,
                         "gate-data": GateDataAblationArguments}, metavar="ABLATION")


def run(args: AblateArguments) -> int:
    name, values = args.ablation, args.values()
    overrides = {flag: getattr(args, flag, None) for flag in OVERRIDABLE}
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.run) / "ablations"
    check_outputs(output_dir, name)
    from emovlm_kd.training.runlock import hold_run_locks_of

    with hold_run_locks_of(args.run, output_dir, purpose="emovlm-kd ablate"):  # a training run there: refused now
        from emovlm_kd.evaluation.ablations import run_ablation

        _, markdown, output_dir = run_ablation(name, args.run, values, overrides, output_dir)
    print(markdown + f"\ntables: {output_dir / name}.json, {output_dir / name}.md")
    return 0


def check_outputs(output_dir, name):
    """`UsageError` when a file the ablation writes (`<name>.json`, `<name>.md`) is a folder, or `--output-dir` a
    file: the user's, never replaced."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir: {output_dir} is a file, not a folder")
    for path in (output_dir / f"{name}.json", output_dir / f"{name}.md"):
        if path.is_dir():
            raise UsageError(f"--output-dir: {path} is a folder, and the ablation writes a file of that name: "
                             "move it or choose another --output-dir")


def _unique(values, flag):
    seen = []
    for value in values:
        if value in seen:
            raise UsageError(f"{flag}: {value} is listed twice")
        seen.append(value)
    return seen


def parse_depths(text):
    """'1024;1024,512' -> [[1024], [1024, 512]]."""
    heads = []
    for part in (p.strip() for p in str(text).split(";")):
        try:
            widths = [int(w) for w in part.split(",")]
        except ValueError:
            raise UsageError(f"--depths: {part!r} is not a comma-separated list of integers") from None
        if not widths or any(w <= 0 for w in widths):
            raise UsageError(f"--depths: widths must be positive, got {part!r}")
        heads.append(widths)
    return _unique(heads, "--depths")


def parse_alphas(text):
    try:
        alphas = [float(a) for a in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--alphas: expected comma-separated numbers, got {text!r}") from None
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise UsageError(f"--alphas: every alpha must be in [0, 1], got {bad[0]}")
    return _unique(alphas, "--alphas")


def parse_gates(text):
    return _parse_names(text, GATE_TITLES, "--gates", "gate type")


def parse_protocols(text):
    return _parse_names(text, GATE_DATA, "--protocols", "gate data")


def _parse_names(text, known, flag, what):
    """A comma list of names out of `known`, without repeats; `UsageError` naming the first unknown one."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"{flag}: unknown {what} {unknown[0] if unknown else text!r}; known: {', '.join(known)}")
    return _unique(names, flag)
