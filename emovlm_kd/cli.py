"""The `emovlm-kd` command line.

    emovlm-kd tiny OUT                                   a tiny random bundle, built offline (smoke tests, CI)
    emovlm-kd predict --model DIR IMAGE_OR_FOLDER...     one JSON line per image
    emovlm-kd train [--config FILE.yaml] [...]           every stage; no --config runs the offline demo
    emovlm-kd split DATASET --output splits.json         a split file to share (reused with --splits FILE)
    emovlm-kd evaluate --model DIR --dataset ...         benchmark report (accuracy, F1, complementarity, ECE)
    emovlm-kd ablate {head-depth,alpha,gate,gate-data} --run RUN   the ablations from a training run's caches
    emovlm-kd table1 --model DIR --data-root ROOT        the paper's Table 1 over several datasets

Each subcommand is a module of `emovlm_kd.commands` with `add_arguments(parser)` and `run(args) -> int`; the
modules import their heavy dependencies inside `run`, so `--help` is fast. The speed benchmark is a script of the
source tree: `python -m benchmarks.bench`.
"""

import argparse
import logging
import os
import sys

from emovlm_kd.commands import ablate, evaluate, predict, split, table1, tiny, train
from emovlm_kd.errors import UsageError

SUBCOMMANDS = {
    "tiny": (tiny, "write a tiny randomly initialised bundle (offline, seeded)"),
    "predict": (predict, "predict the emotion of image files or folders"),
    "train": (train, "run the training stages (the offline demo when no --config is given)"),
    "split": (split, "make a train/val/test split file to share and reuse with --splits"),
    "evaluate": (evaluate, "evaluate a model on a dataset split and write a report"),
    "ablate": (ablate, "head-depth, alpha, gate and gate-data ablations from a run's caches"),
    "table1": (table1, "the paper's Table 1 over several datasets"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="emovlm-kd", description="EmoVLM-KD: visual emotion analysis")
    parser.add_argument("--log-level", default=os.environ.get("EMOVLM_KD_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        own = getattr(module, "TAKES_ITS_OWN_ARGUMENTS", False)  # `train` parses its words with TrlParser
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, add_help=not own)
        sub_parser.set_defaults(_run=module.run, _own_arguments=own)
        module.add_arguments(sub_parser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args._own_arguments:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    try:
        return int(args._run(args) or 0)
    except UsageError as error:
        parser.error(str(error))  # exits with status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
