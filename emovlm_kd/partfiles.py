"""What `predict`'s two part writers share (`emovlm_kd.commands.predict.PartFileLines` for JSON lines,
`emovlm_kd.parquetout.ParquetParts` for Parquet): the record beside a part (`FILE.part.json`), its writing and its
check. An OS error while writing either is raised as `emovlm_kd.folders.write_error` makes it (a path problem, the
user's: exit 2 when the output is opened; a disk's failure: `WriteError`, exit 1)."""

import json

from emovlm_kd.folders import write_error

RECORD_SUFFIX = ".part.json"  # beside FILE.part: what its lines were written for (`run_record`)


def write_part_record(record_file, record):
    """`record` (`run_record`: what a part is written for) as JSON in `record_file`, which `check_part_record` reads
    back on `--resume`; an OS error as `write_error` makes it, naming `record_file`."""
    try:
        record_file.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as error:
        raise write_error(error, record_file) from None


def check_part_record(part, record_file, record, ids):
    """`ValueError` (one line) unless `part` was written for the inputs, model and settings of `record`: its
    `record_file` equals it, and the `ids` of its rows are distinct."""
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
    for number, name in enumerate(ids, 1):
        if name in seen:
            raise ValueError(f"{part} line {number} repeats {name}; remove the file or run without --resume")
        seen.add(name)
    count = record["inputs"].get("count")
    if count is not None and len(seen) > count:
        raise ValueError(f"{part} holds {len(seen)} lines for {count} inputs; remove it or run without --resume")
