"""`emovlm-kd tiny OUT [--backbone qwen2_vl|qwen2_5_vl|qwen3_vl]`: a tiny randomly initialised bundle (model +
processor, FI labels) on the chosen backbone, offline and seeded."""

import argparse

from emovlm_kd.errors import UsageError
from emovlm_kd.folders import check_bundle_folder
from emovlm_kd.labels import KNOWN_LABEL_SETS

# configuration_emovlm_kd.SUPPORTED_BACKBONES, spelt out so that `--help` imports no transformers (a test compares)
BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="folder to write the bundle to")
    parser.add_argument("--labels", default="mikels8", help=f"one of {sorted(KNOWN_LABEL_SETS)} or a comma list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--gate-type", default="concat_linear", metavar="GATE_TYPE",
                        help="concat_linear, moe, bilinear, dynamic_weighting or cross_gating")
    parser.add_argument("--head-hidden-sizes", default="64", help="comma-separated widths, e.g. 64,32")
    parser.add_argument("--backbone", default="qwen2_vl", choices=BACKBONES,
                        help="the tiny VLM's model_type (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT_DIR even when it holds files that are not a bundle's")


def run(args: argparse.Namespace) -> int:
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
