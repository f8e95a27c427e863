"""`emovlm-kd predict --model DIR INPUT...`: one JSON line (or Parquet row) per input image, in input order.

    emovlm-kd predict --model runs/demo/model photos/ > predictions.jsonl
    emovlm-kd predict --model runs/demo/model photos/ --output predictions.jsonl
    emovlm-kd predict --model runs/demo/model photos/ --output predictions.jsonl --resume     # after a kill
    emovlm-kd predict --model runs/demo/model photo.jpg --explain     # + "explanation": why, from the same encoder pass
    emovlm-kd predict --model runs/demo/model part-*.parquet --output predictions.parquet     # parquet in and out
    emovlm-kd predict --model runs/demo/model shard-000.tar shard-001.tar --output p.jsonl    # WebDataset shards
    emovlm-kd predict --model runs/demo/model --dataset user/photos --streaming --output p.parquet   # a Hub dataset
    torchrun --nproc_per_node 4 -m emovlm_kd.cli predict --model runs/demo/model photos/ --output predictions.jsonl

The inputs (`emovlm_kd.collection`): image files and folders, parquet files, WebDataset `.tar` shards, a
`save_to_disk` folder, or `--dataset NAME` (anything `datasets.load_dataset` takes, `--streaming`), numbered in
input order and never read whole; a line names a file by `path`, a dataset row by `id` (`--id-column`). The data
path (`emovlm_kd.datapath`): `--num-workers` DataLoader processes decode, prepare and run the processor while the
model computes; windows of `--group-batches` batches are sorted by image size; rows are written in input order.

Under torchrun (or `accelerate launch`) process `r` of `n` reads the inputs `r, r + n, ...` (a streamed dataset
through `split_dataset_by_node`), each round's rows are gathered and the main process alone writes them, in input
order: the same file as one process gives (scores equal up to float rounding), with the same `.part` and `--resume`.

`--output FILE` is written all or nothing: the lines go to `FILE.part` (for `FILE.parquet`, row groups to the folder
`FILE.part/`: `emovlm_kd.parquetout`), renamed to FILE once every input is done (an older FILE stays as it was until
then); `FILE.part.json` beside it records what they are written for (the inputs, the model's fingerprint, the flags
that change a line). `--resume` keeps the rows of an existing `FILE.part` (a last line cut by the kill is dropped),
checks that they name the first inputs in order, and goes on from their count (the position: a stream is skipped
that far), planning the batches from the start of the window that holds it, so the finished FILE equals an
uninterrupted run's; it refuses (exit 2, one line) a `FILE.part` written for other inputs, another model or other
flags, holding a line twice or rows out of order. Without `--resume`, an existing `FILE.part` is started afresh. A
score that is not finite is an `error` line for its input (skipped), never a NaN in the file. A missing input, or
an `--output` that is a folder, is a usage error found before the model is loaded.

A progress bar (images/s, time left) is shown on a terminal, not with `--quiet`; the last line on stderr says what
was predicted and skipped, in how long, at how many images/s.

The model is checked before the output is opened, and no code from its folder runs (`emovlm_kd.hub.load_model`;
`--trust-remote-code` only for a model that is not an EmoVLM-KD bundle).

Exit status: 0 every input predicted; 1 some skipped (each gets a line with `error`); 2 usage error; 3 the model
could not be loaded (one line naming the file at fault); 141 the reader of stdout went away (`| head`); 130
interrupted (`FILE.part` kept for `--resume`).
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from emovlm_kd.errors import UsageError, few
from emovlm_kd.folders import WriteError, write_error
from emovlm_kd.partfiles import RECORD_SUFFIX, check_part_record, write_part_record
from emovlm_kd.settings import REQUIRED, Checked, DataPathArguments, RuntimeArguments, help_field, positive

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CollectionArguments(Checked):
    """Where `predict`'s images come from beyond files and folders, and how the data path groups and writes them
    (its `--num-workers`: `emovlm_kd.settings.DataPathArguments`, shared with evaluate and table1)."""

    _argument_group_name = "Datasets and the data path"
    dataset: str | None = help_field("a Hugging Face dataset instead of INPUTS: a Hub id, or a local folder "
                                     "load_dataset reads", metavar="NAME")
    dataset_config: str | None = help_field("the dataset's configuration (load_dataset's name)", metavar="NAME")
    split: str | None = help_field("the split to read (default: the only one)")
    streaming: bool = help_field("stream --dataset instead of downloading and preparing it first; parquet and .tar "
                                 "inputs are always streamed, a save_to_disk folder is memory-mapped", False)
    image_column: str | None = help_field("the dataset's image column (default: its first Image column)")
    id_column: str | None = help_field("the column naming each row in the output (default: id, __key__, key, "
                                       "image_id, file_name or filename; else the row's position)")
    group_batches: int = help_field("sort each window of N batches by image size, so a batch pads less (output "
                                    "order unchanged; 1: no sorting)", 8, metavar="N")
    row_group_size: int = help_field("with --output FILE.parquet: rows per row group, each written (and kept for "
                                     "--resume) as it fills", 4096, metavar="ROWS")

    def _checks(self):
        yield from positive(self, "group_batches", "row_group_size", strict=False)


@dataclass(kw_only=True)
class ExplanationArguments(Checked):
    """`--explain` and how the explanation is generated."""

    _argument_group_name = "Explanations"
    explain: bool = help_field("add an 'explanation' per line: the model's answer to the paper's reasoning "
                               "instruction for the same image (one visual-encoder pass per image)", False)
    max_new_tokens: int | None = help_field("length limit of an explanation in tokens (default 128)")
    do_sample: bool = help_field("sample the explanation instead of greedy decoding", False)
    temperature: float | None = help_field("sampling temperature (with --do-sample)")
    seed: int = help_field("seed of the sampling (with --do-sample; default 0)", 0)


@dataclass(kw_only=True)
class PredictArguments(RuntimeArguments, DataPathArguments, CollectionArguments, ExplanationArguments):
    inputs: list[str] = help_field("image files or folders (searched recursively), parquet files, WebDataset .tar "
                                   "shards or a save_to_disk folder", [], positional=True, nargs="*")
    model: str = help_field("bundle folder or Hub id", REQUIRED)
    output: str | None = help_field("write JSON lines here instead of stdout (to FILE.part, renamed at the end); "
                                    "FILE.parquet: a Parquet file instead")
    resume: bool = help_field("continue FILE.part of an interrupted --output FILE from where it stopped", False)
    trust_remote_code: bool = help_field("run the code of a model that is not an EmoVLM-KD bundle; bundles always "
                                         "load with the installed classes", False)


ARGUMENTS = PredictArguments


def run(args: PredictArguments) -> int:
    _check_arguments(args)
    from emovlm_kd import distributed
    from emovlm_kd.collection import open_inputs

    inputs = open_inputs(args.inputs, dataset=args.dataset, split=args.split, streaming=args.streaming,
                         image_column=args.image_column, id_column=args.id_column,
                         dataset_config=args.dataset_config)
    if inputs.count == 0:
        raise UsageError("no input images found in " + (args.dataset or " ".join(args.inputs)))
    model, processor = _load_model(args)  # checked before any output is opened
    main = distributed.is_main_process()
    output, start = _plan_on_main(args, inputs, model) if main else (DiscardLines(), None)
    start = distributed.main_process_decides(lambda: start)  # every process: the same position (or the same error)
    if isinstance(start, UsageError):
        raise start
    began = time.perf_counter()
    try:
        predicted, skipped = _predict_all(model, processor, inputs, start, output, args)
    except BaseException:
        output.abandon()
        raise
    output.finish()
    seconds = time.perf_counter() - began
    if main:
        rate = f" ({(predicted + skipped) / seconds:.1f} images/s)" if seconds > 0 else ""
        print(f"predicted {predicted + output.kept_predicted}, skipped {skipped + output.kept_skipped} "
              f"in {seconds:.1f} s{rate}", file=sys.stderr)
    return 1 if distributed.main_process_decides(lambda: skipped + output.kept_skipped) else 0


def _plan_on_main(args, inputs, model):
    """`(output, position to start at)` on the main process: the output opened (for `--resume`, with the rows kept,
    after checking that they were written for these inputs, this model and these settings, and name the first
    inputs in order); or `(DiscardLines(), UsageError)` when the output cannot be opened (raised on every process,
    after the decision is shared)."""
    try:
        output = _open_output(args, inputs, model)
        start = len(output.kept_ids)
        if start:
            check_kept_ids(output.part, output.kept_ids, inputs.ids(start))
    except UsageError as error:
        return DiscardLines(), error
    if start:
        to_go = f"{inputs.count - start} to go" if inputs.count is not None else "going on from there"
        logger.info("resuming %s: %d input(s) already written, %s", output.part, start, to_go)
    return output, start


def check_kept_ids(part, kept, expected):
    """`UsageError` unless the kept rows name the first inputs, in order (so going on from their count neither
    repeats nor loses a row)."""
    for number, (got, want) in enumerate(zip(kept, expected), 1):
        if str(got) != str(want):
            raise UsageError(f"--resume: {part} row {number} names {got!r} where input {number} is {want!r}; rerun "
                             "with the same inputs, or without --resume")
    if len(expected) < len(kept):
        raise UsageError(f"--resume: {part} holds {len(kept)} rows for {len(expected)} inputs; remove it or run "
                         "without --resume")


def _check_arguments(args):
    """`UsageError` for a bad flag, at once (nothing heavy imported): a `--model` path that does not exist too."""
    from emovlm_kd.modelcheck import local_model_folder

    if not args.inputs and not args.dataset:
        raise UsageError("give input files or folders, or --dataset NAME")
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


def is_parquet(output):
    return bool(output) and Path(output).suffix.lower() == ".parquet"


def _output_problems(output):
    """What makes `--output FILE` unwritable, found before the model is loaded: FILE (or `FILE.part`) an existing
    folder (for Parquet, `FILE.part` an existing file: its parts go in a folder of that name), or a parent folder
    that does not exist."""
    if not output:
        return []
    path = Path(output)
    part = Path(f"{output}.part")
    for taken in (path, Path(f"{output}{RECORD_SUFFIX}")) + (() if is_parquet(output) else (part,)):
        if taken.is_dir():
            return [f"--output: {taken} is a folder; give a file name (e.g. {path / 'predictions.jsonl'})"]
    if is_parquet(output) and part.exists() and not part.is_dir():
        return [f"--output: {part} is a file; a Parquet output keeps its parts in a folder of that name"]
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
                                         trust_remote_code=args.trust_remote_code, quantize=args.quantize)
        return model, processor
    except (OSError, ValueError) as error:
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")


def _predict_all(model, processor, inputs, start, output, args):
    """Predict the inputs from position `start` and write their rows in input order: (predicted, skipped).

    The batches are planned in windows (`emovlm_kd.datapath`: `--group-batches` batches sorted by image size) from
    the start of the window that holds `start`, so a resumed run computes the same batches as an uninterrupted one
    (the rows before `start` of that window are computed again, not written). In one process the rows are written
    as soon as every row before them is done (`_in_order`: after each batch). Under torchrun each process reads and
    predicts its share (`inputs.rows(first, rank, world)`); one window of every process is one round, whose rows
    the main process gathers and writes (`_rounds`)."""
    from tqdm.auto import tqdm

    from emovlm_kd import distributed
    from emovlm_kd.datapath import batch_loader, default_workers, windows
    from emovlm_kd.inference import PromptPrefixCache

    state = distributed.state()
    rank, world = state.process_index, state.num_processes
    span = args.batch_size * args.group_batches * world  # the rows of one round of windows
    first = start - start % span
    workers = args.num_workers if args.num_workers is not None else default_workers(distributed.local_processes())
    loader = batch_loader(inputs.rows(first, rank, world), processor, model.config, args.batch_size,
                          group=args.group_batches, num_workers=workers, pin_memory=model.device.type == "cuda")
    prompt_cache = PromptPrefixCache()  # the model stays frozen for the whole run: its prompt prefix is encoded once
    options = dict(vlm_mode=args.vlm_mode, **_explanation_options(args))
    batches = ((batch, _predict_batch(model, processor, batch, inputs.key, prompt_cache, options))
               for batch in loader)
    ordered = _in_order(batches, first, start) if world == 1 else _rounds(windows(batches), start)
    predicted = skipped = mine = 0
    main = distributed.is_main_process()
    total = None if inputs.count is None else inputs.count - start
    quiet = not logging.getLogger().isEnabledFor(logging.INFO)  # --quiet (or --log-level WARNING)
    with tqdm(total=total, desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True,
              disable=True if (quiet or not main) else None) as bar:  # None: shown on a terminal only
        for local, records in ordered:
            mine += local
            output.write(records)
            errors = sum("error" in record for record in records)
            skipped += errors
            predicted += len(records) - errors
            bar.update(len(records))
    if world > 1:
        logger.info("process %d of %d predicted %d input(s)", rank + 1, world, mine)
    return predicted, skipped


def _in_order(batches, first, start):
    """`(rows, records to write)` after each batch of one process (whose positions run `first, first + 1, ...`):
    the records of every position from the last written on that is done, those before `start` dropped."""
    pending, expected = {}, first
    for _, records in batches:
        pending.update(records)
        ready = []
        while expected in pending:
            record = pending.pop(expected)
            if expected >= start:
                ready.append(record)
            expected += 1
        if ready:
            yield len(ready), ready
    if pending:  # cannot happen: every planned row comes back
        raise RuntimeError(f"rows {sorted(pending)[:3]}... came back without the rows before them")


def _rounds(local_windows, start):
    """`(rows of this process, records to write)` per round under torchrun: every process's window of the round,
    gathered (`accelerate.utils.gather_object`), sorted by position and those before `start` dropped, until no
    process has a window left (each process joins every round: a collective)."""
    from accelerate.utils import gather_object

    local_windows = iter(local_windows)
    while True:
        mine = next(local_windows, None)
        gathered = gather_object([mine])
        if all(window is None for window in gathered):
            return
        rows = sorted((row for window in gathered if window for row in window if row[0] >= start),
                      key=lambda row: row[0])
        yield sum(position >= start for position, _ in mine or ()), [record for _, record in rows]


def _predict_batch(model, processor, batch, key, prompt_cache, options):
    """`[(position, record)]` of a prepared batch, in its order: the prediction, or `error` for a source that is not
    a readable image (or whose scores are not finite)."""
    from emovlm_kd import inference

    readable = [i for i in range(len(batch["rows"])) if i not in batch["errors"]]
    found = {}
    if batch["inputs"] is not None:
        output = inference.run_batch(model, processor, None, inputs=batch["inputs"], prompt_cache=prompt_cache,
                                     **options)
        finite = inference.finite_rows(output)
        found = {i: (inference.describe(output, j, model.config.id2label) if finite[j] else
                     {"error": inference.NON_FINITE_ERROR}) for j, i in enumerate(readable)}
    records = []
    for i, (position, name) in enumerate(batch["rows"]):
        record = {key: name, **(found[i] if i in found else {"error": batch["errors"][i]})}
        if "error" in record:
            logger.warning("skipping %s: %s", name, record["error"])
        records.append((position, record))
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


def _open_output(args, inputs, model):
    if not args.output:
        return StdoutLines()
    record = run_record(inputs, model, args)
    try:
        if is_parquet(args.output):
            from emovlm_kd.parquetout import ParquetParts

            return ParquetParts(args.output, inputs.key, model.config.id2label, resume=args.resume, record=record,
                                row_group_size=args.row_group_size)
        return PartFileLines(args.output, inputs.key, resume=args.resume, record=record)
    except WriteError:
        raise  # the disk (full, failing): exit 1, one line
    except OSError as error:
        raise UsageError(f"--output: cannot write {args.output!r}: {error}")
    except ValueError as error:
        raise UsageError(f"--resume: {error}")


def json_lines(records):
    return "".join(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n" for record in records)


class DiscardLines:
    """What a process other than the main one writes under torchrun: nothing (the main process writes every line)."""

    kept_ids = ()
    kept_predicted = kept_skipped = 0
    part = None

    def write(self, records):
        pass

    def finish(self):
        pass

    def abandon(self):
        pass


class StdoutLines(DiscardLines):
    """Lines to stdout, flushed per window; nothing to resume or rename."""

    def write(self, records):
        sys.stdout.write(json_lines(records))
        sys.stdout.flush()


def run_record(inputs, model, args):
    """What a `.part` file's lines depend on, recorded beside it (`FILE.part.json`) and compared by `--resume`: the
    inputs (`inputs.describe()`: for files their number and a digest of their paths in order; for a dataset how it
    was opened, its size and fingerprint where known), the model (`emovlm_kd.modelcheck.model_fingerprint` of its
    folder) and the settings that change a line (`--vlm-mode` as resolved, `--dtype`, the explanation's flags). The
    batch size, the grouping, the workers, the device and the number of processes may change between a run and its
    resume (a line's scores may then differ in the last digit)."""
    from emovlm_kd.hub import model_folder
    from emovlm_kd.modelcheck import model_fingerprint

    settings = {"vlm_mode": args.vlm_mode or model.config.vlm_mode, "dtype": args.dtype, "explain": args.explain,
                **({"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                    "temperature": args.temperature, "seed": args.seed} if args.explain else {})}
    return {"inputs": inputs.describe(), "model": model_fingerprint(model_folder(args.model)), "settings": settings}


class PartFileLines:
    """Lines to `FILE.part`, renamed to FILE by `finish()` (`os.replace`, after an fsync); `abandon()` closes it and
    keeps it for `--resume`. `record` (`run_record`) is written beside it, to `FILE.part.json`, when it is started.
    With `resume`, an existing `FILE.part` is continued only when its `FILE.part.json` equals `record` and each of its
    lines names a different input (`key`: "path" or "id"; `ValueError` otherwise): its complete lines are kept
    (`kept_ids`, in order; `predict` checks they are the first inputs') and the file is cut after the last of them.
    Otherwise it is started afresh."""

    def __init__(self, path, key="path", resume=False, record=None):
        self.path = Path(path)
        self.part = Path(f"{path}.part")
        self.record_file = Path(f"{path}{RECORD_SUFFIX}")
        records = []
        if resume and self.part.is_file():
            records, end = read_part_lines(self.part, key)
            if records:  # no line yet: nothing to trust or to refuse (killed before its first batch)
                check_part_record(self.part, self.record_file, record, [r[key] for r in records])
            os.truncate(self.part, end)
        elif resume:
            logger.info("no %s to resume: starting afresh", self.part)
        self.kept_ids = [r[key] for r in records]
        self.kept_skipped = sum("error" in r for r in records)
        self.kept_predicted = len(records) - self.kept_skipped
        self.handle = open(self.part, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 (kept for the run)
        if not records:  # the lines (none yet) are cut first: a kill now leaves no line under another record
            try:
                write_part_record(self.record_file, record)
            except OSError:  # e.g. a full disk: nothing of this run is left to be trusted by a rerun
                self.handle.close()
                self.part.unlink(missing_ok=True)
                self.record_file.unlink(missing_ok=True)
                raise

    def write(self, records):
        try:
            self.handle.write(json_lines(records))
            self.handle.flush()
        except OSError as error:  # `--resume` later keeps the complete lines and drops the cut one
            raise write_error(error, self.part) from None

    def finish(self):
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
        except OSError as error:
            raise write_error(error, self.part) from None
        os.replace(self.part, self.path)
        self.record_file.unlink(missing_ok=True)
        logger.info("wrote %s", self.path)

    def abandon(self):
        self.handle.close()
        logger.warning("stopped: the lines written so far are in %s; rerun with --resume to continue", self.part)


def read_part_lines(part, key="path"):
    """`(records, end)` of a `predict` part file: the records of its complete lines and the byte offset after the
    last of them. A last line without its newline (cut by a kill) is dropped; a complete line that is not a JSON
    object with `key` raises `ValueError` (the file is not predict's)."""
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
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{part} line {number} is not a predict line; remove the file or run without --resume")
            records.append(record)
            end += len(line)
    return records, end
