"""The `emovlm-kd` command line.

    emovlm-kd tiny OUT                                   a tiny random bundle, built offline (smoke tests, CI)
    emovlm-kd predict --model DIR IMAGE_OR_FOLDER...     one JSON line per image
    emovlm-kd train [--config FILE.yaml] [...]           the three stages; no --config runs the offline demo
    emovlm-kd evaluate --model DIR --dataset ...         benchmark report (accuracy, F1, complementarity, ECE)
    emovlm-kd ablate {head-depth,alpha,gate} --run RUN   the paper's ablations from a training run's caches
    emovlm-kd table1 --model DIR --data-root ROOT        the paper's Table 1 row over several datasets
    emovlm-kd bench [--config small|tiny]                speed and memory against the paper's protocol

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
"""

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = {
    "tiny": ("emovlm_kd.commands.tiny", "write a tiny randomly initialised bundle (offline, seeded)"),
    "predict": ("emovlm_kd.commands.predict", "predict the emotion of image files or folders"),
    "train": ("train.cli", "run the training stages (the offline demo when no --config is given)"),
    "evaluate": ("eval.cli", "evaluate a model on a dataset split and write a report"),
    "ablate": ("eval.ablations", "head-depth, alpha and gate ablations from a run's caches"),
    "table1": ("eval.table1", "the paper's Table 1 row over several datasets"),
    "bench": ("emovlm_kd.bench", "measure speed and memory against the paper's protocol"),
}


class UsageError(Exception):
    """A bad flag or value: the command exits with status 2 and this message."""


def build_parser(argv=()):
    """The parser; only the chosen subcommand's module is imported (training code is slow to import)."""
    parser = argparse.ArgumentParser(prog="emovlm-kd", description="EmoVLM-KD: visual emotion analysis")
    parser.add_argument("--log-level", default=os.environ.get("EMOVLM_KD_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if name == chosen:
            _load(module).add_arguments(sub_parser)
    return parser


def _load(module):
    return importlib.import_module(module)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    try:
        return int(_load(args._module).run(args) or 0)
    except UsageError as error:
        parser.error(str(error))  # exits with status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
