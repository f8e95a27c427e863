"""A CSV or JSONL manifest: one row per image, `path` (or `image`) relative to the manifest's folder, `label`, and
optionally `split` (without it the rows are split 80/10/10, or by `split_ratios`)."""

import csv
import json
from pathlib import Path

from emovlm_kd.data.records import UNSPLIT, Listing, Record, normalise_label, normalise_split

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def is_manifest(path):
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(path, options=None):
    """Records of a CSV/JSONL manifest (`path` or `image`, `label`, optional `split`), paths relative to its folder."""
    rows = _read_manifest_rows(path)
    has_split = any(row.get("split") not in (None, "") for _, row in rows)
    splits = {}
    for number, row in rows:
        where = f"{path} line {number}"
        image = row.get("path") or row.get("image")
        if not image or "label" not in row:
            raise ValueError(f"{where}: needs `path` (or `image`) and `label`, got keys {sorted(row)}")
        split = normalise_split(row.get("split"), where) if has_split else UNSPLIT
        record = Record(path.parent / image, normalise_label(row["label"], where), Path(image).as_posix())
        splits.setdefault(split, []).append(record)
    return Listing(splits)


def _read_manifest_rows(path):
    """`[(line_number, row_dict)]` from a CSV (with a header) or a JSONL file."""
    with open(path, encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            return [(number, row) for number, row in enumerate(csv.DictReader(file), start=2)]
        rows = []
        for number, line in enumerate(file, start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number}: expected a JSON object, got {line.strip()!r}")
                rows.append((number, row))
        return rows
