"""What `predict`'s two part writers share (`emovlm_kd.commands.predict.PartFileLines` for JSON lines,
`emovlm_kd.parquetout.ParquetParts` for Parquet): the record beside a part (`FILE.part.json`) and its check, and
how an OS error while writing becomes a path problem (exit 2) or a disk's failure (`WriteError`, exit 1)."""

import errno
import json

from emovlm_kd.folders import WriteError

# errors that say the path is wrong (the user's to fix: exit 2), not that the disk failed (exit 1)
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG}
RECORD_SUFFIX = ".part.json"  # beside FILE.part: what its lines were written for (`run_record`)


def write_error(error, path):
    """A disk's failure (ENOSPC, EIO, EDQUOT, ...) as `WriteError` naming `path`; a path problem as it is."""
    if error.errno in PATH_ERRORS:
        return error
    return WriteError(error.errno, error.strerror, str(path))


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
