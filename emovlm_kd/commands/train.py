"""`emovlm-kd train`: every stage from a dataset and a Qwen2-VL checkpoint to one Hub model.

    emovlm-kd train                                      # the embedded demo: synthetic data, tiny models, CPU
    emovlm-kd train --dataset mydata                     # your class folders (mydata/<class>/*.jpg), tiny models
    emovlm-kd train --config fi --dataset /data/FI --output-dir runs/fi
    emovlm-kd train --config fi --help                   # every flag, with the values that config gives it
    torchrun --nproc_per_node 4 -m emovlm_kd.cli train --config fi --dataset /data/FI

The settings are `emovlm_kd.training.config`'s dataclasses, parsed by TRL's `TrlParser`: a flag overrides the
`--config` YAML (a path, or a shipped config by name: demo, fi, emoset, emotion6, flickr, instagram), which
overrides the defaults (the paper's settings). Without `--config`, a `--dataset` of your own keeps the demo's tiny
models and training settings but not its synthetic data's: the categorical instructions alone (one log line says so
and how to add answers), RUN = runs/<dataset name>, nothing synthetic written.
"""

import argparse
import logging

from emovlm_kd.errors import InputError, UsageError

logger = logging.getLogger(__name__)

TAKES_ITS_OWN_ARGUMENTS = True  # the CLI hands the words after `train` to TrlParser (see emovlm_kd.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing here: `run` parses the words after `train` with TrlParser (its `--help` lists every flag)."""


def run(args: argparse.Namespace) -> int:
    from emovlm_kd.distributed import is_main_process
    from emovlm_kd.training.config import parse_train_args
    from emovlm_kd.training.preflight import PreflightError, preflight
    from emovlm_kd.training.runlock import hold_run_lock

    try:
        cfg = parse_train_args(args.rest)
    except (ValueError, OSError) as error:
        raise UsageError(str(error))

    try:  # before the training code is imported or anything is written: every input resolved, every problem at once
        dataset = preflight(cfg)  # a local dataset, read (its labels and splits checked); None: the demo's or the Hub's
    except PreflightError as error:
        raise UsageError(str(error)) from None
    with hold_run_lock(cfg.output_dir):  # a second run on RUN is refused now, not after the training imports
        from emovlm_kd.training.annotate import AnnotatorError
        from emovlm_kd.training.runner import format_results, run_training

        try:
            results = run_training(cfg, dataset)
        except (InputError, FileExistsError, AnnotatorError) as error:  # the user's data, labels or answers; a
            # RUN/model holding the user's files; an annotator endpoint that failed for good (answers so far are
            # kept). Any other error, a stage's `ValueError` included, is a bug: it keeps its traceback (exit 1)
            logger.error("%s", error)
            raise UsageError(str(error)) from None
    if is_main_process():
        print(format_results(results))
        print(f"model: {cfg.output_dir}/model   results: {cfg.output_dir}/eval_results.json")
    return 0
