"""Frozen outputs computed once, kept on disk as safetensors under a fingerprint of model + data.

A cache file is named by the fingerprint of everything that produced it; a changed model, dataset, prompt or
setting gives another name, so a stale cache is never read. Files are written to a temp name and renamed
(`emovlm_kd.folders`).

What a key sees of the data: a split's ids and labels, its `datasets` fingerprint and, once the run has passed
the split through `with_files_fingerprint`, each image file's size and modification time (`stat`) or size and
sha256 (`content`); images whose bytes the dataset holds itself are hashed (sha256) in either mode.
"""

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emovlm_kd.folders import respect_umask, staged_file  # noqa: F401  (respect_umask: the runner's)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
VERIFY_DATA = ("stat", "content")  # what a key sees of each image file (--verify-data)
CHUNK = 1 << 20  # bytes read at a time when hashing a file
ROWS_PER_BATCH = 1024  # image cells read (undecoded) at a time
CELLS_PER_TASK = 64  # image cells a worker thread stamps at a time (one task per cell costs more than a stat)


def fingerprint_module(module, sample_every=997):
    """Hash of a module's parameters: names, shapes, dtypes, sums and a strided sample of values (fast for 7B)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if flat.numel():
                sample = flat[::sample_every].float().cpu()
                digest.update(sample.numpy().tobytes())
                digest.update(repr(float(flat.float().sum())).encode())
    return digest.hexdigest()[:16]


def fingerprint_dataset(split):
    """Hash of a dataset split: its length, every (id, label) in order and its `datasets` fingerprint.

    The image files are covered through that fingerprint: `with_files_fingerprint` (applied by the training run to
    every split it loads) folds each file's size and modification time, or its content hash, into it. A split that
    did not pass through it is covered by its `datasets` fingerprint only (for a local dataset: the file paths).
    """
    digest = hashlib.sha256()
    fingerprint = getattr(split, "_fingerprint", None)
    digest.update(str(len(split)).encode())
    for row_id, label in zip(split["id"], split["label"]):
        digest.update(f"{row_id}|{label};".encode())
    if fingerprint:
        digest.update(fingerprint.encode())
    return digest.hexdigest()[:16]


def sha256_file(path):
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def image_stamp(path, data, verify="stat"):
    """What a key sees of one image cell: `bytes` held in the dataset are hashed (sha256); a file at `path` gives
    its size and modification time in ns (`verify="stat"`) or its size and sha256 (`"content"`); a path that cannot
    be read gives `missing:` and the path (the image pass then reports it)."""
    if data is not None:
        return "bytes:" + hashlib.sha256(data).hexdigest()
    try:
        info = os.stat(path)
        if verify == "content":
            return f"{info.st_size}:{sha256_file(path)}"
        return f"{info.st_size}:{info.st_mtime_ns}"
    except (OSError, TypeError):  # TypeError: a cell without a path
        return f"missing:{path}"


def files_fingerprint(split, verify="stat"):
    """Hash of the images behind a split's `image` column, row by row, without decoding any: see `image_stamp`.

    The column's cells are read undecoded (`Image(decode=False)`: a `path` and/or `bytes`), which covers every
    layout the loader reads: local files (class folders, FI, EmoSet, Emotion6, Flickr/Instagram, manifests, Hub
    datasets whose column holds paths) have a path and no bytes; Hub and `save_to_disk` datasets with an `Image`
    column usually hold the bytes (hashed) and sometimes a local path (stat or content, as for files). Files are
    stat-ed or read by a thread pool, a batch of rows at a time."""
    from datasets import Image
    from tqdm.auto import tqdm

    if verify not in VERIFY_DATA:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_DATA)}, got {verify!r}")
    cells = split.select_columns(["image"]).cast_column("image", Image(decode=False))
    digest = hashlib.sha256(f"{verify};".encode())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(cells), desc=f"Fingerprinting images ({verify})", unit="img",
                 disable=len(cells) < 1000 or None) as bar:
        for batch in cells.iter(batch_size=ROWS_PER_BATCH):
            images = batch["image"]
            tasks = [images[i : i + CELLS_PER_TASK] for i in range(0, len(images), CELLS_PER_TASK)]
            for stamps in pool.map(partial(stamp_cells, verify=verify), tasks):  # in order
                digest.update("".join(f"{stamp};" for stamp in stamps).encode())
            bar.update(len(images))
    return digest.hexdigest()[:16]


def stamp_cells(cells, verify):
    """`image_stamp` of undecoded image cells ({"path", "bytes"})."""
    return [image_stamp(cell.get("path"), cell.get("bytes"), verify) for cell in cells]


def with_files_fingerprint(split, files):
    """The same rows with a `datasets` fingerprint that also covers `files` (a `files_fingerprint` of them), so
    every key made from `fingerprint_dataset` (and every fingerprint `datasets` derives from it) changes with the
    images. A contiguous `select`: no data is copied."""
    return split.select(range(len(split)), new_fingerprint=fingerprint("files", split._fingerprint, files))


def fingerprint_checkpoint(name_or_path):
    """Identity of a checkpoint: for a local folder its files' names, sizes and modification times (a checkpoint
    replaced at the same path gets a new fingerprint); for a Hub id, the id."""
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def fingerprint(*parts):
    """Hash of JSON-serialisable parts (settings, other fingerprints)."""
    payload = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class TensorCache:
    """`RUN/cache/<name>-<fingerprint>.safetensors`; `get` returns None when absent (never a stale file)."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, name, key):
        return self.root / f"{name}-{key}.safetensors"

    def get(self, name, key):
        path = self.path(name, key)
        if not path.exists():
            return None
        logger.info("cache hit: %s", path.name)
        return load_file(path)

    def put(self, name, key, tensors, metadata=None):
        path = self.path(name, key)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        with staged_file(path) as tmp:  # given the umask's mode (safetensors creates its file 0600), then renamed
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        for stale in self.root.glob(f"{name}-*.safetensors"):
            if stale != path:
                logger.info("removing stale cache %s", stale.name)
                stale.unlink(missing_ok=True)
        return path

    def get_or_compute(self, name, key, compute, metadata=None):
        cached = self.get(name, key)
        if cached is not None:
            return cached
        tensors = compute()
        self.put(name, key, tensors, metadata)
        return tensors
