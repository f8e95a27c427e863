"""`emovlm-kd predict --model DIR INPUT...`: one JSON line per input image.

    emovlm-kd predict --model runs/demo/model photos/ > predictions.jsonl
    emovlm-kd predict --model runs/demo/model photos/ --output predictions.jsonl
    emovlm-kd predict --model runs/demo/model photos/ --output predictions.jsonl --resume     # after a kill
    emovlm-kd predict --model runs/demo/model photo.jpg --explain     # + "explanation": why, from the same encoder pass
    torchrun --nproc_per_node 4 -m emovlm_kd.cli predict --model runs/demo/model photos/ --output predictions.jsonl

Under torchrun (or `accelerate launch`) each round of `--batch-size` x processes inputs is split between the
processes (each on its own GPU, or the CPU), and the main process alone writes the gathered lines, in input order:
the same file as one process gives (scores equal up to float rounding), with the same `.part` and `--resume`.

`--output FILE` is written all or nothing: the lines go to `FILE.part`, renamed to FILE once every input is done
(an older FILE stays as it was until then); `FILE.part.json` beside it records what they are written for (the
inputs, the model's fingerprint, the flags that change a line). `--resume` keeps the lines of an existing
`FILE.part` (a last line cut by the kill is dropped) and predicts only the inputs none of them names (by `path`), so
the finished FILE equals an uninterrupted run's; it refuses (exit 2, one line) a `FILE.part` written for other
inputs, another model or other flags, or holding a line twice. Without `--resume`, an existing `FILE.part` is started
afresh. A score that is not finite is an `error` line for its input (skipped), never a NaN in the file. A missing
input, or an `--output` that is a folder, is a usage error found before the model is loaded.

The model is checked before the output is opened, and no code from its folder runs (`emovlm_kd.hub.load_model`;
`--trust-remote-code` only for a model that is not an EmoVLM-KD bundle).

Exit status: 0 every input predicted; 1 some skipped (each gets a line with `error`); 2 usage error; 3 the model
could not be loaded (one line naming the file at fault); 141 the reader of stdout went away (`| head`); 130
interrupted (`FILE.part` kept for `--resume`).
"""

import argparse
import errno
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from emovlm_kd.errors import UsageError, few
from emovlm_kd.runtime import add_device_arguments
from emovlm_kd.folders import WriteError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="bundle folder or Hub id")
    parser.add_argument("--output", help="write JSON lines here instead of stdout (to FILE.part, renamed at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue FILE.part of an interrupted --output FILE, skipping the inputs it holds")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--vlm-mode", choices=["score", "generate"], default=None,
                        help="how the VLM branch answers (default: the model's config)")
    add_device_arguments(parser)
    explain = parser.add_argument_group("explanations")
    explain.add_argument("--explain", action="store_true",
                         help="add an 'explanation' per line: the model's answer to the paper's reasoning instruction "
                              "for the same image (one visual-encoder pass per image)")
    explain.add_argument("--max-new-tokens", type=int, default=None,
                         help="length limit of an explanation in tokens (default 128)")
    explain.add_argument("--do-sample", action="store_true", help="sample the explanation instead of greedy decoding")
    explain.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    explain.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --do-sample; default 0)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the code of a model that is not an EmoVLM-KD bundle; bundles always load with the "
                             "installed classes")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    from emovlm_kd import distributed
    from emovlm_kd.images import iter_image_files

    paths = list(iter_image_files(args.inputs))
    if not paths:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    model, processor = _load_model(args)  # checked before any output is opened
    main = distributed.is_main_process()
    output, todo = _plan_on_main(args, paths, model) if main else (DiscardLines(), None)
    todo = distributed.main_process_decides(lambda: todo)  # every process: the same inputs (or the same error)
    if isinstance(todo, UsageError):
        raise todo
    try:
        predicted, skipped = _predict_all(model, processor, todo, output, args)
    except BaseException:
        output.abandon()
        raise
    output.finish()
    predicted += sum("error" not in record for record in output.records)
    skipped += sum("error" in record for record in output.records)
    if main:
        print(f"predicted {predicted}, skipped {skipped}", file=sys.stderr)
    return 1 if distributed.main_process_decides(lambda: skipped) else 0


def _plan_on_main(args, paths, model):
    """`(output, inputs to predict)` on the main process: the output opened (for `--resume`, with the lines kept,
    after checking that they were written for these inputs, this model and these settings), the inputs none of
    them names; or `(DiscardLines(), UsageError)` when the output cannot be opened (raised on every process, after
    the decision is shared)."""
    try:
        output = _open_output(args, paths, model)
    except UsageError as error:
        return DiscardLines(), error
    done = {record["path"] for record in output.records}
    todo = [path for path in paths if str(path) not in done]
    if output.records:
        logger.info("resuming %s: %d input(s) already written, %d to go", output.part, len(done), len(todo))
    return output, todo


def _check_arguments(args):
    """`UsageError` for a bad flag, at once (nothing heavy imported): a `--model` path that does not exist too."""
    from emovlm_kd.modelcheck import local_model_folder

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resume and not args.output:
        raise UsageError("--resume continues an --output FILE: give --output")
    if not args.explain and (args.max_new_tokens is not None or args.do_sample or args.temperature is not None):
        raise UsageError("--max-new-tokens, --do-sample and --temperature shape the explanation: add --explain")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and (args.temperature <= 0 or not args.do_sample):
        raise UsageError("--temperature must be > 0 and goes with --do-sample")
    problems = _missing_inputs(args.inputs) + _output_problems(args.output)
    try:
        local_model_folder(args.model)
    except OSError as error:
        problems.insert(0, f"--model: {error}")
    if problems:
        raise UsageError("; ".join(problems))


def _missing_inputs(inputs):
    """One problem naming every input that does not exist (found before the model is loaded), or none."""
    missing = [item for item in inputs if not os.path.lexists(item)]
    if not missing:
        return []
    return [f"no such file or folder: {few(missing)}"]


def _output_problems(output):
    """What makes `--output FILE` unwritable, found before the model is loaded: FILE (or `FILE.part`) an existing
    folder, or a parent folder that does not exist."""
    if not output:
        return []
    path = Path(output)
    for taken in (path, Path(f"{output}.part"), Path(f"{output}{RECORD_SUFFIX}")):
        if taken.is_dir():
            return [f"--output: {taken} is a folder; give a file name (e.g. {path / 'predictions.jsonl'})"]
    if not path.absolute().parent.is_dir():
        return [f"--output: no such folder: {path.absolute().parent}"]
    return []


def _load_model(args):
    """The checked model and processor; `ModelCheckError` (exit status 3) propagates, the rest is a `UsageError`."""
    from emovlm_kd.hub import load_model
    from emovlm_kd.runtime import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    try:
        model, processor, _ = load_model(args.model, device=device, dtype=dtype,
                                         trust_remote_code=args.trust_remote_code)
        return model, processor
    except (OSError, ValueError) as error:
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")


def _predict_all(model, processor, paths, output, args):
    """Predict `paths` round by round, each round's lines written (and flushed) in input order before the next:
    (predicted, skipped). Under torchrun each process predicts its share of a round (`sharded_batches`, at most
    `--batch-size` images) and the main process writes the gathered lines (`gather_in_order`)."""
    from tqdm.auto import tqdm

    from emovlm_kd import distributed
    from emovlm_kd.inference import PromptPrefixCache, gather_in_order, sharded_batches

    prompt_cache = PromptPrefixCache()  # the model stays frozen for the whole run: its prompt prefix is encoded once
    predicted = skipped = 0
    main, mine_total = distributed.is_main_process(), 0
    with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, disable=None if main else True) as bar:
        for mine in sharded_batches(paths, args.batch_size):
            mine_total += len(mine)
            records = gather_in_order(_predict_batch(model, processor, mine, args, prompt_cache))
            output.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n" for record in records)
            skipped += sum("error" in record for record in records)
            predicted += len(records) - sum("error" in record for record in records)
            bar.update(len(records))
    if distributed.world_size() > 1:
        state = distributed.state()
        logger.info("process %d of %d predicted %d input(s)", state.process_index + 1, state.num_processes, mine_total)
    return predicted, skipped


def _predict_batch(model, processor, paths, args, prompt_cache):
    """One record per path, in order: the prediction, or `error` for a file that is not a readable image."""
    from functools import partial

    from emovlm_kd.images import load_image_file
    from emovlm_kd.inference import predict_files

    load = partial(load_image_file, max_side=model.config.max_image_side)
    found = predict_files(model, processor, paths, load, prompt_cache=prompt_cache, vlm_mode=args.vlm_mode,
                          **_explanation_options(args))
    records = [{"path": str(path), **record} for path, record in zip(paths, found)]
    for record in records:
        if "error" in record:
            logger.warning("skipping %s: %s", record["path"], record["error"])
    return records


def _explanation_options(args):
    """`run_batch`'s explanation arguments from the flags: greedy unless `--do-sample` (then seeded by `--seed`)."""
    if not args.explain:
        return {}
    generation = {"do_sample": args.do_sample}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        generation["temperature"] = args.temperature
    return {"explain": True, "generation_kwargs": generation, "seed": args.seed if args.do_sample else None}


# ----------------------------------------------------------------------------------------------------------------
# Where the lines go
# ----------------------------------------------------------------------------------------------------------------


def _open_output(args, paths, model):
    if not args.output:
        return StdoutLines()
    try:
        return PartFileLines(args.output, resume=args.resume, record=run_record(paths, model, args))
    except WriteError:
        raise  # the disk (full, failing): exit 1, one line
    except OSError as error:
        raise UsageError(f"--output: cannot write {args.output!r}: {error}")
    except ValueError as error:
        raise UsageError(f"--resume: {error}")


class DiscardLines:
    """What a process other than the main one writes under torchrun: nothing (the main process writes every line)."""

    records = ()
    part = None

    def write(self, lines):
        pass

    def finish(self):
        pass

    def abandon(self):
        pass


class StdoutLines:
    """Lines to stdout, flushed per batch; nothing to resume or rename."""

    records = ()
    part = None

    def write(self, lines):
        sys.stdout.write("".join(lines))
        sys.stdout.flush()

    def finish(self):
        pass

    def abandon(self):
        pass


# errors that say the path is wrong (the user's to fix: exit 2), not that the disk failed (exit 1)
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG}
RECORD_SUFFIX = ".part.json"  # beside FILE.part: what its lines were written for (`run_record`)


def run_record(paths, model, args):
    """What a `.part` file's lines depend on, recorded beside it (`FILE.part.json`) and compared by `--resume`: the
    inputs (their number and a digest of their paths in order), the model (`emovlm_kd.modelcheck.model_fingerprint`
    of its folder) and the settings that change a line (`--vlm-mode` as resolved, `--dtype`, the explanation's
    flags). The batch size, the device and the number of processes may change between a run and its resume."""
    from emovlm_kd.hub import model_folder
    from emovlm_kd.modelcheck import model_fingerprint

    digest = hashlib.sha256("\0".join(str(path) for path in paths).encode("utf-8", "surrogateescape")).hexdigest()
    settings = {"vlm_mode": args.vlm_mode or model.config.vlm_mode, "dtype": args.dtype, "explain": args.explain,
                **({"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                    "temperature": args.temperature, "seed": args.seed} if args.explain else {})}
    return {"inputs": {"count": len(paths), "sha256": digest}, "model": model_fingerprint(model_folder(args.model)),
            "settings": settings}


class PartFileLines:
    """Lines to `FILE.part`, renamed to FILE by `finish()` (`os.replace`, after an fsync); `abandon()` closes it and
    keeps it for `--resume`. `record` (`run_record`) is written beside it, to `FILE.part.json`, when it is started.
    With `resume`, an existing `FILE.part` is continued only when its `FILE.part.json` equals `record` and each of its
    lines names a different one of the inputs (`ValueError` otherwise): its complete lines are kept (`records`) and
    the file is cut after the last of them. Otherwise it is started afresh."""

    def __init__(self, path, resume=False, record=None):
        self.path = Path(path)
        self.part = Path(f"{path}.part")
        self.record_file = Path(f"{path}{RECORD_SUFFIX}")
        self.records = []
        if resume and self.part.is_file():
            self.records, end = read_part_lines(self.part)
            if self.records:  # no line yet: nothing to trust or to refuse (killed before its first batch)
                check_part_record(self.part, self.record_file, record, self.records)
            os.truncate(self.part, end)
        elif resume:
            logger.info("no %s to resume: starting afresh", self.part)
        self.handle = open(self.part, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 (kept for the run)
        if not self.records:  # the lines (none yet) are cut first: a kill now leaves no line under another record
            try:
                self.record_file.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
            except OSError as error:  # e.g. a full disk: nothing of this run is left to be trusted by a rerun
                self.handle.close()
                self.part.unlink(missing_ok=True)
                self.record_file.unlink(missing_ok=True)
                raise self._write_error(error, self.record_file) from None

    @staticmethod
    def _write_error(error, path):
        """A disk's failure (ENOSPC, EIO, EDQUOT, ...) as `WriteError` naming `path`; a path problem as it is."""
        if error.errno in PATH_ERRORS:
            return error
        return WriteError(error.errno, error.strerror, str(path))

    def write(self, lines):
        try:
            self.handle.write("".join(lines))
            self.handle.flush()
        except OSError as error:  # `--resume` later keeps the complete lines and drops the cut one
            raise self._write_error(error, self.part) from None

    def finish(self):
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
        except OSError as error:
            raise self._write_error(error, self.part) from None
        os.replace(self.part, self.path)
        self.record_file.unlink(missing_ok=True)
        logger.info("wrote %s", self.path)

    def abandon(self):
        self.handle.close()
        logger.warning("stopped: the lines written so far are in %s; rerun with --resume to continue", self.part)


def check_part_record(part, record_file, record, records):
    """`ValueError` (one line) unless `part` was written for the inputs, model and settings of `record`: its
    `record_file` equals it, and its `records` name distinct paths."""
    try:
        written = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = None
    if not isinstance(written, dict):
        raise ValueError(f"{part} has no readable {record_file.name} saying what it was written for; remove it or "
                         "run without --resume")
    differs = [what for what, name in (("other inputs", "inputs"), ("another model", "model"),
                                        ("other settings", "settings")) if written.get(name) != record.get(name)]
    if differs:
        raise ValueError(f"{part} was written for {' and '.join(differs)} than this run's; rerun with the same "
                         "inputs, model and flags, or without --resume")
    seen = set()
    for number, line in enumerate(records, 1):
        if line["path"] in seen:
            raise ValueError(f"{part} line {number} repeats {line['path']}; remove the file or run without --resume")
        seen.add(line["path"])
    if len(seen) > record["inputs"]["count"]:
        raise ValueError(f"{part} holds {len(seen)} lines for {record['inputs']['count']} inputs; remove it or run "
                         "without --resume")


def read_part_lines(part):
    """`(records, end)` of a `predict` part file: the records of its complete lines and the byte offset after the
    last of them. A last line without its newline (cut by a kill) is dropped; a complete line that is not a JSON
    object with a `path` raises `ValueError` (the file is not predict's)."""
    records, end = [], 0
    with open(part, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                logger.info("%s: dropping its last line, cut short (%d bytes)", part, len(line))
                break
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "path" not in record:
                raise ValueError(f"{part} line {number} is not a predict line; remove the file or run without --resume")
            records.append(record)
            end += len(line)
    return records, end
