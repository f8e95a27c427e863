"""What `predict` reads: image files and folders, or the rows of a Hugging Face dataset, as one numbered sequence of
`Row`s that is never held in memory whole, split between the processes of a `torchrun` launch.

    open_inputs(["photos/"])                                   # files and folders (recursive), sorted: `FileInputs`
    open_inputs(["shards/000.tar", "shards/001.tar"])          # WebDataset shards: `DatasetInputs`, streamed
    open_inputs(["part-0.parquet", "part-1.parquet"])          # parquet files, streamed
    open_inputs(["saved/"])                                    # a `save_to_disk` folder (memory-mapped)
    open_inputs([], dataset="user/photos", streaming=True)     # a Hub dataset id (or a local builder folder)

The formats, as `datasets` reads them:
- parquet: the "parquet" packaged builder, `load_dataset("parquet", data_files=..., streaming=True)`; an image
  column is an `Image` feature (a struct of `bytes` and `path`, as `Dataset.to_parquet` writes it).
- WebDataset: the "webdataset" packaged builder: each tar holds samples as files sharing a key, `KEY.jpg` (or png,
  webp, ...) beside `KEY.json` / `KEY.cls`; a row has `__key__`, `__url__` and one column per extension, an image
  extension's an `Image` feature (datasets/packaged_modules/webdataset/webdataset.py: `base_plus_ext`,
  `IMAGE_EXTENSIONS`; https://huggingface.co/docs/datasets/image_dataset#webdataset).
- `save_to_disk` folders: `load_from_disk` (Arrow files, memory-mapped).
- `--dataset NAME`: `load_dataset(NAME, split=..., streaming=...)`, a Hub id or anything else `load_dataset` takes
  (a local folder of data files is resolved by the same call, offline: how the tests exercise this path).
Local parquet and tar inputs are always streamed (read as they are iterated; no Arrow copy is written to the cache).

Images are never decoded here: the image column is cast to `Image(decode=False)` and a row carries its encoded
bytes (or its path), decoded later in a `DataLoader` worker (`emovlm_kd.datapath`) by the same code as a file
(`emovlm_kd.images.load_image_bytes`), so a row and the file it was made from get the same prediction.

Positions: row `i` of the input order has position `i`; `rows(start, rank, world)` yields the rows from `start` on
whose `(position - start) % world == rank`: the process's share under torchrun (for a streamed dataset,
`datasets.distributed.split_dataset_by_node(..., strategy="examples")`; for a map-style one the same rows by
`select`). The rows of one round (the next `n` rows of every process) are then one contiguous run of positions,
which the main process writes in order (`emovlm_kd.commands.predict`). `--resume` restarts at a position.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from emovlm_kd.errors import UsageError, few, first_line

logger = logging.getLogger(__name__)

ID_COLUMNS = ("id", "__key__", "key", "image_id", "file_name", "filename")  # the first present is a row's id
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")  # when no column has the `Image` feature
DATA_SUFFIXES = {".parquet": "parquet", ".tar": "webdataset"}


@dataclass(frozen=True)
class Row:
    """One input: `position` in the input order, `id` (what its output line names), `source` (a path, or a dict
    with the encoded image's `bytes` and/or `path`, or a PIL image)."""

    position: int
    id: Any
    source: Any


def open_inputs(inputs, dataset=None, split=None, streaming=False, image_column=None, id_column=None,
                dataset_config=None):
    """`FileInputs` or `DatasetInputs` for `predict`'s positional inputs or its `--dataset`; `UsageError` (one line)
    for a mix of kinds, an unreadable dataset, or columns that are not there."""
    if dataset is not None:
        if inputs:
            raise UsageError("give either input files/folders or --dataset, not both")
        return DatasetInputs.load(dataset, split=split, streaming=streaming, image_column=image_column,
                                  id_column=id_column, config=dataset_config)
    kinds = {input_kind(item) for item in inputs}
    if len(kinds) > 1:
        raise UsageError(f"the inputs mix {' and '.join(sorted(kinds))}; give one kind per run")
    kind = kinds.pop()
    if kind == "files":
        if image_column or id_column or split or streaming:
            raise UsageError("--image-column, --id-column, --split and --streaming go with a dataset input, not files")
        from emovlm_kd.images import iter_image_files

        return FileInputs(list(iter_image_files(inputs)))
    if kind == "save_to_disk":
        if len(inputs) > 1:
            raise UsageError(f"give one save_to_disk folder per run, not {len(inputs)}")
        return DatasetInputs.load(inputs[0], split=split, streaming=streaming, image_column=image_column,
                                  id_column=id_column, from_disk=True)
    return DatasetInputs.load(kind, split=split, streaming=True, image_column=image_column, id_column=id_column,
                              data_files=[str(Path(item).absolute()) for item in inputs])


def input_kind(item):
    """"save_to_disk" (a folder `Dataset.save_to_disk` wrote), "parquet" or "webdataset" (a file by its suffix), or
    "files" (an image file or a folder of them)."""
    path = Path(item)
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return "save_to_disk" if saved else "files"
    return DATA_SUFFIXES.get(path.suffix.lower(), "files")


class FileInputs:
    """Image files, in `iter_image_files` order; a line names its input by `path`."""

    key = "path"

    def __init__(self, paths):
        self.paths = paths
        self.count = len(paths)

    def describe(self):
        digest = hashlib.sha256("\0".join(str(path) for path in self.paths).encode("utf-8", "surrogateescape"))
        return {"count": self.count, "sha256": digest.hexdigest()}

    def ids(self, stop):
        return [str(path) for path in self.paths[:stop]]

    def rows(self, start=0, rank=0, world=1):
        for position in range(start + rank, self.count, world):
            yield Row(position, str(self.paths[position]), self.paths[position])


class DatasetInputs:
    """The rows of one split of a `datasets` dataset (`Dataset` or, streamed, `IterableDataset`), its image column
    cast to `Image(decode=False)`; a line names its row by `id` (the id column's value, else the position)."""

    key = "id"

    def __init__(self, dataset, what, image_column, id_column, path_column=False):
        self.dataset, self.what = dataset, what
        self.image_column, self.id_column, self.path_column = image_column, id_column, path_column
        self.streamed = not hasattr(dataset, "__len__")
        self.count = None if self.streamed else len(dataset)

    @classmethod
    def load(cls, source, split=None, streaming=False, image_column=None, id_column=None, config=None,
             data_files=None, from_disk=False):
        """Open `source`: a packaged builder name with `data_files`, a `save_to_disk` folder (`from_disk`), or a
        `load_dataset` name (Hub id or local folder)."""
        import datasets

        if data_files:
            where = f"{few(data_files, 3)} ({source})"
        else:
            where = str(source)
        try:
            if from_disk:
                loaded = datasets.load_from_disk(str(source))
            else:
                loaded = datasets.load_dataset(str(source), config, data_files=data_files, split=split,
                                               streaming=streaming)
        except Exception as error:  # datasets raises FileNotFoundError, ValueError, DatasetNotFoundError, ...
            if isinstance(error, (KeyboardInterrupt, MemoryError)):
                raise
            raise UsageError(f"cannot read {where} as a dataset: {type(error).__name__}: {first_line(error)}")
        loaded = pick_split(loaded, split, where)
        image_column = find_image_column(loaded, image_column, where)
        id_column = find_id_column(loaded, id_column, image_column, where)
        path_column = not isinstance(loaded.features[image_column], datasets.Image)
        kept = [image_column] + ([id_column] if id_column and id_column != image_column else [])
        loaded = loaded.select_columns(kept)  # parquet reads only these columns
        if not path_column:
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))  # decoded in the workers
        spelled = {"source": str(source), "data_files": data_files, "split": split, "config": config,
                   "streaming": bool(streaming or data_files), "image_column": image_column, "id_column": id_column}
        return cls(loaded, spelled, image_column, id_column, path_column)

    def describe(self):
        """What `--resume` compares: how the dataset was named and opened, its size where known, and what says
        whether it changed (a map-style dataset's fingerprint; local data files' sizes and modification times)."""
        described = dict(self.what, count=self.count)
        if not self.streamed:
            described["fingerprint"] = getattr(self.dataset, "_fingerprint", None)
        files = self.what.get("data_files") or []
        described["files"] = [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]
        return described

    def _id(self, row, position):
        return position if self.id_column is None else row[self.id_column]

    def ids(self, stop):
        """The ids of the first `stop` rows (the id column alone is read)."""
        if self.id_column is None:
            return list(range(stop))
        only = self.dataset.select_columns([self.id_column])
        if not self.streamed:
            return list(only.select(range(min(stop, self.count)))[self.id_column])
        return [row[self.id_column] for row in islice(only, stop)]

    def rows(self, start=0, rank=0, world=1):
        """The process's share of the rows from position `start` (see the module's docstring)."""
        if self.streamed:
            from datasets.distributed import split_dataset_by_node

            share = self.dataset.skip(start) if start else self.dataset
            if world > 1:  # one row in `world`, whatever the shards (`shards` would change the order)
                share = split_dataset_by_node(share, rank=rank, world_size=world, strategy="examples")
        else:
            share = self.dataset
            if start or world > 1:
                share = share.select(range(start + rank, self.count, world))
        for j, row in enumerate(share):
            position = start + j * world + rank
            yield Row(position, self._id(row, position), row[self.image_column])


def pick_split(loaded, split, where):
    """The one split of a `DatasetDict` (the named `split`, or the only one there is)."""
    if not hasattr(loaded, "keys"):
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split is None:
        raise UsageError(f"{where} has the splits {', '.join(names)}: choose one with --split")
    if split not in loaded:
        raise UsageError(f"{where} has no split {split!r} (it has {', '.join(names)})")
    return loaded[split]


def find_image_column(dataset, requested, where):
    """`requested`, else the first `Image` column, else one named as an image usually is (holding paths)."""
    import datasets

    features = dataset.features
    if features is None:
        raise UsageError(f"{where}: its columns are not known before reading; give --image-column")
    if requested is not None:
        if requested not in features:
            raise UsageError(f"--image-column {requested!r} is not a column of {where}: {', '.join(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMNS:
        if name in features:
            return name
    raise UsageError(f"{where} has no image column among {', '.join(features)}: give --image-column")


def find_id_column(dataset, requested, image_column, where):
    """`requested`, else the first of `ID_COLUMNS` present, else None (a row is named by its position)."""
    features = dataset.features
    if requested is not None:
        if requested not in features:
            raise UsageError(f"--id-column {requested!r} is not a column of {where}: {', '.join(features)}")
        return requested
    return next((name for name in ID_COLUMNS if name in features and name != image_column), None)
