"""`emovlm-kd tiny OUT [--backbone qwen2_vl|qwen2_5_vl|qwen3_vl]`: a tiny randomly initialised bundle (model +
processor, FI labels) on the chosen backbone, offline and seeded."""

from dataclasses import dataclass

from emovlm_kd.errors import UsageError
from emovlm_kd.folders import check_bundle_folder
from emovlm_kd.labels import KNOWN_LABEL_SETS
from emovlm_kd.settings import REQUIRED, help_field

# configuration_emovlm_kd.SUPPORTED_BACKBONES, spelt out so that `--help` imports no transformers (a test compares)
BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(kw_only=True)
class TinyArguments:
    output_dir: str = help_field("folder to write the bundle to", REQUIRED, positional=True)
    labels: str = help_field(f"one of {sorted(KNOWN_LABEL_SETS)} or a comma list", "mikels8")
    seed: int = help_field("seed of the random weights", 0)
    gate_type: str = help_field("concat_linear, moe, bilinear, dynamic_weighting or cross_gating", "concat_linear",
                                metavar="GATE_TYPE")
    head_hidden_sizes: str = help_field("comma-separated widths, e.g. 64,32", "64")
    backbone: str = help_field("the tiny VLM's model_type (default: %(default)s)", "qwen2_vl", choices=BACKBONES)
    overwrite: bool = help_field("replace OUTPUT_DIR even when it holds files that are not a bundle's", False)


ARGUMENTS = TinyArguments


def run(args: TinyArguments) -> int:
    labels = KNOWN_LABEL_SETS.get(args.labels) or [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise UsageError(f"--labels: need at least two labels, got {args.labels!r}")
    try:
        hidden = [int(x) for x in args.head_hidden_sizes.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--head-hidden-sizes must be comma-separated integers, got {args.head_hidden_sizes!r}")
    check_output_dir(args.output_dir, args.overwrite)  # before torch and transformers are imported: in milliseconds
    from configuration_emovlm_kd import GATE_TYPES
    from emovlm_kd.hub import save_bundle
    from emovlm_kd.tiny import build_tiny_bundle

    if args.gate_type not in GATE_TYPES:
        raise UsageError(f"--gate-type must be one of {GATE_TYPES}, got {args.gate_type!r}")
    model, processor = build_tiny_bundle(labels, seed=args.seed, head_hidden_sizes=hidden, gate_type=args.gate_type,
                                         backbone=args.backbone)
    try:
        out = save_bundle(model, processor, args.output_dir, overwrite=args.overwrite)
    except FileExistsError as error:
        raise UsageError(str(error))
    print(f"wrote a tiny EmoVLM-KD bundle ({args.backbone}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters) to {out}")
    return 0


def check_output_dir(output_dir, overwrite):
    """`UsageError` when OUTPUT_DIR holds anything a bundle does not consist of (the user's files, a bundle file's
    name taken by a folder) and `--overwrite` was not given; needs neither torch nor transformers."""
    try:
        check_bundle_folder(output_dir, overwrite)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
