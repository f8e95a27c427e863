"""Several processes (torchrun / accelerate launch) through accelerate's `PartialState`: the main process decides,
the others follow; cached passes are split between the processes and gathered back in order on every one.

In one process every helper is a no-op (`PartialState` then describes a single, non-distributed process).
"""

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm


def state():
    """The process state; the first call joins the process group under torchrun (gloo on CPU, nccl on CUDA).

    `cpu=True` without CUDA: otherwise accelerate takes several CPU processes for a single one (and the state is
    shared by every later `PartialState`, the Trainer's included)."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process():
    return state().is_main_process


def world_size():
    return state().num_processes


def barrier():
    state().wait_for_everyone()


def main_process_decides(value_fn):
    """`value_fn()` evaluated on the main process and shared with all (so every process takes the same branch)."""
    if world_size() == 1:
        return value_fn()
    box = [value_fn() if is_main_process() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def map_sharded(compute_batch, length, batch_size, desc="caching"):
    """Run `compute_batch(indices) -> dict of tensors` over range(length) in batches, each process a contiguous
    share (`split_between_processes`); every process gets the full concatenation in the original order."""
    parts = []
    with state().split_between_processes(list(range(length))) as mine:
        with tqdm(total=len(mine), desc=desc, unit="img", disable=not is_main_process() or None,
                  leave=False) as bar:  # the stage's log line follows it
            for begin in range(0, len(mine), batch_size):
                indices = mine[begin : begin + batch_size]
                parts.append(compute_batch(indices))
                bar.update(len(indices))
    local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
    if world_size() == 1:
        return local
    gathered = [g for g in gather_object([local]) if g is not None]  # one entry per process, in rank order
    return {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]}
