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
        if not isinstance(image, str) or not isinstance(row["label"], (str, int)) or isinstance(row["label"], bool):
            raise ValueError(f"{where}: `path` must be a string and `label` a string (or integer), got "
                             f"{image!r} and {row['label']!r}")  # fmt: skip
        split = normalise_split(row.get("split"), where) if has_split else UNSPLIT
        record = Record(path.parent / image, normalise_label(row["label"], where), Path(image).as_posix())
        splits.setdefault(split, []).append(record)
    return Listing(splits)


def _read_manifest_rows(path):
    """`[(line_number, row_dict)]` from a CSV (with a header) or a JSONL file; a line that is not a row (not JSON,
    not a JSON object, a CSV row with more or fewer fields than the header) is a `ValueError` naming file and line."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            return _csv_rows(path, file) if path.suffix.lower() == ".csv" else _jsonl_rows(path, file)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _csv_rows(path, file):
    reader = csv.DictReader(file)
    rows = []
    try:
        for row in reader:
            if None in row or any(value is None for key, value in row.items() if key != "split"):
                # more fields than the header, or fewer (only an optional last `split` may be left out)
                header = len(reader.fieldnames)
                fields = header + len(row.get(None, [])) - sum(value is None for value in row.values())
                raise ValueError(f"{path} line {reader.line_num}: {fields} field(s) where the header "
                                 f"{reader.fieldnames} has {header}")  # fmt: skip
            rows.append((reader.line_num, row))
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num}: not a CSV row ({error})") from None
    return rows


def _jsonl_rows(path, file):
    rows = []
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {line.strip()[:80]!r}")
        rows.append((number, row))
    return rows
