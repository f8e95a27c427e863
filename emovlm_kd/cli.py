"""The `emovlm-kd` command line.

    emovlm-kd tiny OUT                                   a tiny random bundle, built offline (smoke tests, CI)
    emovlm-kd predict --model DIR IMAGE_OR_FOLDER...     one JSON line per image
    emovlm-kd demo --model DIR                           the Gradio demo in the browser (upload, explain, batch)
    emovlm-kd train [--config FILE.yaml] [...]           every stage; no --config runs the offline demo
    emovlm-kd split DATASET --output splits.json         a split file to share (reused with --splits FILE)
    emovlm-kd evaluate --model DIR --dataset ...         benchmark report (accuracy, F1, complementarity, ECE)
    emovlm-kd ablate {head-depth,alpha,gate,gate-data} --run RUN   the ablations from a training run's caches
    emovlm-kd table1 --model DIR --data-root ROOT        the paper's Table 1 over several datasets

Each subcommand is a module of `emovlm_kd.commands` with `ARGUMENTS`, its settings dataclass (composed from the
shared groups of `emovlm_kd.settings`; every field a flag), and `run(arguments) -> int`, which receives it parsed and
checked (`train` parses its own words with TRL's `TrlParser`: `--config YAML`; `predict` still has
`add_arguments(parser)` and `run(namespace)`). The modules import their heavy dependencies inside `run`, so `--help`
is fast. The speed benchmark is a script of the
source tree: `python -m benchmarks.bench`.

Exit status: what `run` returns (0 done; `predict`: 1 some images skipped); 1 an OS error (a full disk, no
permission: one line naming the file and the errno; `emovlm_kd.folders.WriteError` for our writes, which leave
nothing half-written); 2 a usage error (`UsageError`);
3 the model could not be loaded (`ModelCheckError`: one line naming the file and what is wrong); 130 interrupted;
141 stdout closed by its reader (`emovlm-kd predict ... | head -1`), quietly, as a process ended by SIGPIPE.
"""

import argparse
import logging
import os
import sys

from emovlm_kd.commands import ablate, demo, evaluate, predict, split, table1, tiny, train
from emovlm_kd.errors import ModelCheckError, UsageError
from emovlm_kd.folders import describe_os_error
from emovlm_kd.helptext import HelpFormatter, parsers_of
from emovlm_kd.logs import setup_logging
from emovlm_kd.settings import add_arguments, read

EXIT_OS_ERROR = 1  # a full disk, no permission, ...: one line naming the file and the errno
EXIT_MODEL = 3  # the model could not be loaded
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

# OpenMP threads that wait for work sleep instead of spinning: on a busy machine spinning threads steal the cores
# the other threads need (a stage-1 step of the demo went from 0.1 s to 2.1 s under load); a user's value wins
PROCESS_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

SUBCOMMANDS = {
    "tiny": (tiny, "write a tiny randomly initialised bundle (offline, seeded)"),
    "predict": (predict, "predict the emotion of image files or folders"),
    "train": (train, "run the training stages (the offline demo when no --config is given)"),
    "split": (split, "make a train/val/test split file to share and reuse with --splits"),
    "evaluate": (evaluate, "evaluate a model on a dataset split and write a report"),
    "ablate": (ablate, "head-depth, alpha, gate and gate-data ablations from a run's caches"),
    "table1": (table1, "the paper's Table 1 over several datasets"),
    "demo": (demo, "try a model in the browser: a Gradio app (needs the demo extra: gradio)"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="emovlm-kd", description="EmoVLM-KD: visual emotion analysis",
                                     parents=[output_options(argparse.SUPPRESS)])
    parser.set_defaults(log_level=os.environ.get("EMOVLM_KD_LOG_LEVEL", "INFO"), quiet=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        own = getattr(module, "TAKES_ITS_OWN_ARGUMENTS", False)  # `train` parses its words with TrlParser
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, add_help=not own,
                                    parents=[output_options(argparse.SUPPRESS)])
        sub_parser.set_defaults(_module=module, _own_arguments=own)
        if hasattr(module, "ARGUMENTS"):
            add_arguments(sub_parser, module.ARGUMENTS)
        else:
            module.add_arguments(sub_parser)
    for each in parsers_of(parser):
        each.formatter_class = HelpFormatter
    return parser


def output_options(default):
    """--log-level and --quiet, accepted before and after the subcommand (`default` SUPPRESS: a value given in one
    place is not reset by the other parser)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--log-level", default=default, metavar="LEVEL",
                         help="DEBUG, INFO (default; $EMOVLM_KD_LOG_LEVEL), WARNING or ERROR")
    options.add_argument("--quiet", action="store_true", default=default, help="warnings and errors only")
    return options


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args._own_arguments:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    setup_logging(args.log_level, quiet=args.quiet)
    for name, value in PROCESS_ENVIRONMENT.items():  # before torch is imported (the commands import it lazily)
        os.environ.setdefault(name, value)
    try:
        return int(run_command(args) or 0)
    except UsageError as error:
        parser.error(str(error))  # exits with status 2
    except ModelCheckError as error:
        print(f"{parser.prog}: the model could not be loaded: {error}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not stdout_closed():
            raise  # another pipe or socket: a real error
        silence_stdout()
        return EXIT_STDOUT_CLOSED
    except Exception as error:  # an OS error (or safetensors' error carrying one: "... (os error 28)")
        line = describe_os_error(error)
        if line is None:
            raise
        logging.getLogger(__name__).debug("the OS error's traceback", exc_info=True)
        print(f"{parser.prog}: {line}", file=sys.stderr)
        return EXIT_OS_ERROR


def run_command(args):
    """The command's `run` with its settings dataclass read from `args` (a value its checks refuse: `UsageError`),
    or with `args` itself for a command without `ARGUMENTS`."""
    module = args._module
    if not hasattr(module, "ARGUMENTS"):
        return module.run(args)
    try:
        arguments = read(args, module.ARGUMENTS)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return module.run(arguments)


def stdout_closed():
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it); True where poll is missing."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def silence_stdout():
    """Point stdout's file descriptor at the null device, so that Python's flush at exit cannot fail again (the
    recipe of Python's `signal` documentation for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
