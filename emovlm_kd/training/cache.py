"""Frozen outputs computed once, kept on disk as safetensors under a fingerprint of model + data.

A cache file is named by the fingerprint of everything that produced it; a changed model, dataset, prompt or
setting gives another name, so a stale cache is never read. Files are written to a temp name and renamed.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


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
    """Hash of a dataset split: ids, labels and, for local files, their sizes and modification times."""
    digest = hashlib.sha256()
    fingerprint = getattr(split, "_fingerprint", None)
    digest.update(str(len(split)).encode())
    for row_id, label in zip(split["id"], split["label"]):
        digest.update(f"{row_id}|{label};".encode())
    if fingerprint:
        digest.update(fingerprint.encode())
    return digest.hexdigest()[:16]


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


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
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
