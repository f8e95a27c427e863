"""Quiet, useful output: our log lines on stderr, the Trainers' metric dicts in a file, progress bars only on a
terminal, and the libraries' expected warnings dropped where they are emitted.

- `setup_logging(level, quiet)`: the CLI's logging (`--quiet` = warnings and errors only).
- `quiet_libraries()`: transformers / datasets / huggingface_hub progress bars off unless stderr is a terminal
  (no `\\r` spam in a log file); the expected messages and warnings filtered out where they are emitted (the
  libraries' expected log messages are demoted to DEBUG: `--log-level DEBUG` still shows them).
- `trainer_log_file(path)`: a `TrainerCallback` appending every Trainer log dict to a JSON-lines file (RUN/logs/STAGE.jsonl);
  `route_trainer_logs(trainer, path)` puts it in place of the callbacks that print those dicts to stdout.
"""

import json
import logging
import os
import sys
import warnings
from pathlib import Path

# what the libraries say on every run although nothing is wrong and nothing is for the user to do:
# (logger, message start)
EXPECTED_LOG_MESSAGES = (
    ("transformers.trainer_utils", "mtime may not be reliable"),  # checkpoint rotation on a fast filesystem
    ("transformers.distributed.tensor_parallel", "The following layers were not sharded"),  # no tensor parallelism
    # bitsandbytes, when imported (by PEFT / TRL, in every train, ablate and benchmark run) on a CPU with AVX512-BF16,
    # tries an optional CPU 4-bit kernel from the Hub through the `kernels` package and falls back to its own, which
    # is what runs anyway (our 4-bit training is on CUDA): the failure and its "pip install kernels" advice are noise
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),  # the same kernel look-up with HF_HUB_OFFLINE=1
)
EXPECTED_WARNINGS = (
    (FutureWarning, r"`gradient_checkpointing` is deprecated"),  # TRL's SFTConfig field, renamed in transformers 5
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # read by TRL / PEFT on every step
)
# environment settings the libraries read when imported (a user's own values win)
LIBRARY_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "warning"}
NO_PROGRESS_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def interactive():
    """Whether stderr is a terminal (progress bars redraw there; in a file they are `\r` spam)."""
    return sys.stderr.isatty()


class DropMessage(logging.Filter):
    """On a library's logger: its records that start with `start` are demoted to DEBUG, and dropped unless that
    logger is enabled for DEBUG (`--log-level DEBUG`)."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def filter(self, record):
        if not record.getMessage().startswith(self.start):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def setup_logging(level="INFO", quiet=False):
    """One format for our lines on stderr; `quiet` keeps warnings and errors only; then `quiet_libraries()`."""
    level = logging.WARNING if quiet else getattr(logging, str(level).upper(), logging.INFO)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # also when the root logger had handlers already (basicConfig does nothing)
    quiet_libraries()
    return level


def quiet_libraries():
    """transformers at warnings; progress bars of transformers, datasets and huggingface_hub off without a terminal;
    the expected messages and warnings dropped. Through the environment variables the libraries read on import (a
    command that stops early never imports them), or their functions when they are imported already."""
    settings = dict(LIBRARY_ENVIRONMENT, **({} if interactive() else NO_PROGRESS_BARS))
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    for logger_name, start in EXPECTED_LOG_MESSAGES:
        library_logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropMessage) and f.start == start for f in library_logger.filters):
            library_logger.addFilter(DropMessage(start))
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("httpx", "httpcore"):  # a line per HTTP request (the demo's own startup checks, gradio_client)
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper(), logging.WARNING))
        if not interactive():
            hf_logging.disable_progress_bar()
    if not interactive():
        for module, function in (("datasets", "disable_progress_bars"), ("huggingface_hub.utils", "disable_progress_bars")):
            if module in sys.modules:
                getattr(sys.modules[module], function)()


def tidy_transformers_bars():
    """transformers' per-save and per-load bars leave no line behind (`leave=False`; a run saves a checkpoint per
    epoch), and a "Writing model shards" bar over a single shard is not drawn at all. Through transformers'
    `set_tqdm_hook`; call it once transformers is imported (the training does, at its start)."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        items = args[0] if args else kwargs.get("iterable")
        kwargs = dict(kwargs, leave=False)
        if kwargs.get("desc") == "Writing model shards" and hasattr(items, "__len__") and len(items) <= 1:
            kwargs["disable"] = True
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def trainer_log_file(path):
    """A `TrainerCallback` appending each Trainer log dict (loss, learning rate, ...) to `path` as a JSON line."""
    from transformers import TrainerCallback

    class TrainerLogFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    path = Path(path)
    return TrainerLogFile()


def route_trainer_logs(trainer, path=None):
    """The Trainer's log dicts go to `path` (nowhere when None) instead of stdout; its progress bar stays, on a
    terminal only."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # the bar, not the dicts
            return None

        def on_train_end(self, args, state, control, **kwargs):  # the stage's log line follows: no bar left behind
            if getattr(self, "training_bar", None) is not None:
                self.training_bar.leave = False
            return super().on_train_end(args, state, control, **kwargs)

    had_bar = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if had_bar and interactive():
        trainer.add_callback(BarOnly())
    if path is not None:
        trainer.add_callback(trainer_log_file(path))
    return trainer
