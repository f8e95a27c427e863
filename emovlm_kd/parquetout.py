"""`predict --output FILE.parquet`: the rows as a Parquet file, written in row groups as they come, all or nothing.

Columns (one row per input, in input order): `id` (string: the file's path, or the dataset row's id), `label`,
`score`, `scores` (a struct with a float per label), `vlm` (`label`, `scores`, `answer`), `distill` (`label`,
`score`, `scores`), `explanation`, `error`: the JSON line's fields, null where a line has none
(`pyarrow.parquet.read_table(FILE).to_pylist()` gives the JSON lines back, `id` for `path`, with nulls).

A Parquet file is only readable once its footer is written, so a killed writer leaves nothing to resume. The rows
therefore go, `row_group_size` at a time (at the end of a `predict` window), to complete files in the folder
`FILE.part/` (`rows-000000.parquet`, ...), with `FILE.part.json` beside it as for JSON lines. `--resume` keeps those
files (their `id`s are checked against the inputs) and goes on after their last row; the rows of a group not yet
written are predicted again. `finish()` copies the groups, one at a time, into `FILE`, then removes the folder.
Every file is written by `emovlm_kd.folders.staged_file` (a temp name beside it, fsynced, renamed): the temp file of
a write cut by a kill, in `FILE.part/` or beside `FILE`, is a leftover that the next run over `FILE` removes
(`folders.is_leftover`). Only files of these names are ever removed from `FILE.part/`: a folder holding anything
else is refused.
"""

import logging
import re
from pathlib import Path

from emovlm_kd.folders import PARTIAL_WRITE, is_leftover, remove_leftovers, staged_file
from emovlm_kd.partfiles import RECORD_SUFFIX, check_part_record, write_part_record

logger = logging.getLogger(__name__)

GROUP_FILE = re.compile(r"rows-\d{6}\.parquet")


def is_group_file(name):
    """Whether `name` is a row group's file in `FILE.part/`, or the temp file of one being written."""
    temp = PARTIAL_WRITE.match(name)
    return GROUP_FILE.fullmatch(temp["name"] if temp else name) is not None


def parquet_schema(id2label):
    import pyarrow as pa

    labels = [id2label[i] for i in sorted(id2label)]
    scores = pa.struct([(label, pa.float64()) for label in labels])
    return pa.schema([
        ("id", pa.string()), ("label", pa.string()), ("score", pa.float64()), ("scores", scores),
        ("vlm", pa.struct([("label", pa.string()), ("scores", scores), ("answer", pa.string())])),
        ("distill", pa.struct([("label", pa.string()), ("score", pa.float64()), ("scores", scores)])),
        ("explanation", pa.string()), ("error", pa.string()),
    ])  # fmt: skip


class ParquetParts:
    """The writer (same interface as `predict`'s `PartFileLines`); `key` names a record's id ("path" or "id")."""

    def __init__(self, path, key, id2label, resume=False, record=None, row_group_size=4096):
        self.path, self.key = Path(path), key
        self.part = Path(f"{path}.part")
        self.record_file = Path(f"{path}{RECORD_SUFFIX}")
        self.schema, self.row_group_size = parquet_schema(id2label), row_group_size
        self.buffer, self.groups = [], []
        foreign = self._foreign_files()
        if foreign:
            raise ValueError(f"{self.part} holds files predict did not write ({', '.join(foreign[:3])}); move them "
                             "or choose another --output")
        self._remove_leftovers()
        kept = []
        if resume and self.part.is_dir():
            self.groups = sorted(self.part.glob("rows-*.parquet"))
            kept = self._kept_rows()
            if kept:
                check_part_record(self.part, self.record_file, record, [name for name, _ in kept])
        else:
            if resume:
                logger.info("no %s to resume: starting afresh", self.part)
            self._remove(list(self.part.glob("rows-*.parquet")) if self.part.is_dir() else [])
        self.kept_ids = [name for name, _ in kept]
        self.kept_skipped = sum(error for _, error in kept)
        self.kept_predicted = len(kept) - self.kept_skipped
        if not kept:
            self.part.mkdir(exist_ok=True)
            write_part_record(self.record_file, record)

    def _foreign_files(self):
        if not self.part.is_dir():
            return []
        return sorted(entry.name for entry in self.part.iterdir() if not is_group_file(entry.name))

    def _remove_leftovers(self):
        """The temp files of writes cut by a kill (their process gone): of the groups, and of FILE beside it."""
        if self.part.is_dir():
            self._remove([entry for entry in self.part.iterdir() if is_leftover(entry.name)])
        remove_leftovers(self.path)

    @staticmethod
    def _remove(files):
        for file in files:
            file.unlink(missing_ok=True)

    def _kept_rows(self):
        """`[(id, has error)]` of the complete group files, in order (their `id` and `error` columns only)."""
        import pyarrow.parquet as pq

        kept = []
        for group in self.groups:
            try:
                table = pq.read_table(group, columns=["id", "error"])
            except Exception as error:  # pyarrow raises ArrowInvalid, OSError...: not ours to continue
                raise ValueError(f"{group} does not read as Parquet ({error}); remove {self.part} or run without "
                                 "--resume") from None
            kept.extend(zip(table.column("id").to_pylist(), (e is not None for e in table.column("error").to_pylist())))
        return kept

    def write(self, records):
        self.buffer.extend(records)
        if len(self.buffer) >= self.row_group_size:
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        rows = [{**{k: v for k, v in record.items() if k != self.key}, "id": str(record[self.key])}
                for record in self.buffer]
        group = self.part / f"rows-{len(self.groups):06d}.parquet"
        with staged_file(group, fsync=True) as temporary:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), temporary)
        self.groups.append(group)
        self.buffer = []

    def finish(self):
        import pyarrow.parquet as pq

        self._flush()
        with staged_file(self.path, fsync=True) as temporary, pq.ParquetWriter(temporary, self.schema) as writer:
            for group in self.groups:  # one group in memory at a time
                writer.write_table(pq.read_table(group))
        self._remove(self.groups)
        self.part.rmdir()
        self.record_file.unlink(missing_ok=True)
        logger.info("wrote %s", self.path)

    def abandon(self):
        try:
            self._flush()  # whole windows only: a resumed run plans the same batches
        except Exception as error:  # the failure that stopped the run, most likely: the groups written are kept
            logger.debug("not flushed: %s", error)
        logger.warning("stopped: the rows written so far are in %s; rerun with --resume to continue", self.part)
