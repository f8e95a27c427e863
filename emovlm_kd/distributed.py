"""Several processes (torchrun / accelerate launch): shard the cached passes, gather on every rank."""

import logging

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def main_process_decides(value_fn):
    """`value_fn()` evaluated on the main process and shared with all (so every process takes the same branch)."""
    if not is_distributed():
        return value_fn()
    box = [value_fn() if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed():
    """Join the process group when started by torchrun (the Trainer would otherwise do it later)."""
    import os

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed() and int(os.environ["WORLD_SIZE"]) > 1:
        from accelerate import PartialState

        PartialState()  # initialises torch.distributed (gloo on CPU, nccl on CUDA)


def map_sharded(compute_batch, length, batch_size, desc="caching"):
    """Run `compute_batch(indices) -> dict of tensors` over range(length) in batches, each process a contiguous
    shard; every process gets the full concatenation in the original order."""
    shard = -(-length // world_size())
    start, stop = min(length, rank() * shard), min(length, (rank() + 1) * shard)
    parts = []
    with tqdm(total=stop - start, desc=desc, unit="img", disable=not is_main_process() or None) as bar:
        for begin in range(start, stop, batch_size):
            indices = list(range(begin, min(stop, begin + batch_size)))
            parts.append(compute_batch(indices))
            bar.update(len(indices))
    local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
    if not is_distributed():
        return local
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, local)
    gathered = [g for g in gathered if g is not None]
    return {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]}
