"""`emovlm-kd train`: every stage from a dataset and a Qwen2-VL checkpoint to one Hub model.

    emovlm-kd train                                      # the embedded demo: synthetic data, tiny models, CPU
    emovlm-kd train --config configs/fi.yaml --dataset /data/FI --output-dir runs/fi
    torchrun --nproc_per_node 4 -m emovlm_kd.cli train --config configs/fi.yaml --dataset /data/FI

Every flag overrides one field of the config (see `emovlm-kd train --help`).
"""

import dataclasses
import logging
import types
import typing

logger = logging.getLogger(__name__)


def _flag_type(field):
    hint = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing), {})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is list:
        return lambda text: [int(x) for x in text.split(",") if x.strip()]
    return base if base in (int, float, str) else str


def add_arguments(parser):
    from emovlm_kd.training.config import TrainConfig

    parser.add_argument("--config", help="YAML file of settings (default: the embedded demo)")
    group = parser.add_argument_group("settings (each overrides the config's field)")
    for field in dataclasses.fields(TrainConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_type(field),
            default=None,
            help=f"{help_text} (demo default: {default})".strip(),
        )


def run(args):
    from emovlm_kd.errors import UsageError
    from emovlm_kd.training.config import TrainConfig, load_config

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as error:
        raise UsageError(str(error))
    except OSError as error:
        raise UsageError(f"--config: {error}")
    if cfg.dataset != "demo":
        from pathlib import Path

        if not Path(cfg.dataset).exists() and ("/" not in cfg.dataset or cfg.dataset.startswith(("/", "."))):
            raise UsageError(f"--dataset: {cfg.dataset!r} does not exist")
    from emovlm_kd.training.runner import format_results, run_training

    try:
        results = run_training(cfg)
    except ValueError as error:  # bad data or labels, found before expensive work
        logger.error("%s", error)
        raise UsageError(str(error))
    from emovlm_kd.distributed import is_main_process

    if is_main_process():
        print(format_results(results))
        print(f"model: {cfg.output_dir}/model   results: {cfg.output_dir}/eval_results.json")
    return 0
