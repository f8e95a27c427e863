"""Several processes (torchrun / accelerate launch) through accelerate's `PartialState`: the main process decides,
the others follow; cached passes are split between the processes and gathered back in order on every one.

In one process every helper is a no-op (`PartialState` then describes a single, non-distributed process).
"""

import atexit
import os

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from emovlm_kd.errors import UsageError


def state():
    """The process state; the first call joins the process group under torchrun (gloo on CPU, nccl on CUDA).

    `cpu=True` without CUDA: otherwise accelerate takes several CPU processes for a single one (and the state is
    shared by every later `PartialState`, the Trainer's included). Before joining, a launch with more processes on
    this node than visible CUDA devices stops with a `UsageError` (`check_processes_per_device`)."""
    if PartialState._shared_state == {}:  # not joined yet (accelerate's `initialized`): nothing has run
        check_processes_per_device(local_processes(), visible_cuda_devices())
        joined = PartialState(cpu=not torch.cuda.is_available())
        if joined.use_distributed:
            atexit.register(leave_process_group)
        return joined
    return PartialState(cpu=not torch.cuda.is_available())


def leave_process_group():
    """Destroy the process group at exit (registered by the first `state()` under torchrun): a gloo group left to the
    interpreter's teardown sometimes aborted a finished process ("terminate called without an active exception",
    SIGABRT, seen in about 1 of 8 two-process CPU launches), failing a launch whose work was done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def local_processes():
    """How many processes the launcher started on this node (torchrun's and accelerate's `LOCAL_WORLD_SIZE`; 1 when
    launched alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def visible_cuda_devices():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_processes_per_device(processes, cuda_devices):
    """Stop (`UsageError`) when `processes` on one node would share `cuda_devices` CUDA devices: NCCL, the backend
    accelerate takes on CUDA, fails with 'invalid usage' when two processes use one GPU, and only after the models
    are loaded. Without CUDA (gloo on the CPU) or with a device per process, nothing to say."""
    if cuda_devices == 0 or processes <= cuda_devices:
        return
    raise UsageError(
        f"{processes} processes were launched on this node but only {cuda_devices} CUDA device(s) are visible: "
        f"each process needs its own GPU (NCCL). Launch at most {cuda_devices} (torchrun --nproc_per_node "
        f"{cuda_devices}), or run the processes on the CPU with CUDA_VISIBLE_DEVICES= (gloo)"
    )


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
