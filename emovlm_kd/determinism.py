"""Deterministic kernels for a run: the same seed and settings give the same weights on a rerun and after a resume,
on CUDA too, where torch has deterministic algorithms.

    from emovlm_kd.determinism import deterministic

    with deterministic():          # around a run (training, an ablation)
        ...

What it sets, and restores on exit (each documented in torch's "Reproducibility" notes):

- `torch.use_deterministic_algorithms(True, warn_only=True)`: deterministic kernels where torch has them; an op
  without one warns instead of stopping the run (`warn_only=False` makes it an error);
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless already set): cuBLAS reads it when it creates its handle, i.e. at the
  first matrix product on CUDA, so it must be set before any; a later call logs a warning;
- `torch.backends.cudnn.deterministic = True`, `torch.backends.cudnn.benchmark = False` (no autotuned choice of
  convolution kernels, which can differ from run to run).

Nothing happens at import.
"""

import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def determinism_settings():
    """The settings `enable_determinism` changes, as they are now (what `restore_determinism` takes)."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get(CUBLAS_WORKSPACE[0]),
    }


def enable_determinism(warn_only=True):
    """Deterministic algorithms (`warn_only`: warn, not fail, on an op without one), cuBLAS's fixed workspace and
    cuDNN's deterministic, non-benchmarked kernels. Returns the settings before (`determinism_settings`)."""
    before = determinism_settings()
    name, value = CUBLAS_WORKSPACE
    if os.environ.get(name) is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            logger.warning("%s set after CUDA started: it takes effect only if cuBLAS has not run yet", name)
        os.environ[name] = value
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return before


def restore_determinism(settings):
    """Put back what `determinism_settings()` returned."""
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"], warn_only=settings["warn_only"])
    torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    if settings["cublas_workspace_config"] is None:
        os.environ.pop(CUBLAS_WORKSPACE[0], None)
    else:
        os.environ[CUBLAS_WORKSPACE[0]] = settings["cublas_workspace_config"]


@contextlib.contextmanager
def deterministic(warn_only=True):
    """`enable_determinism(warn_only)` for the block, the settings before restored after it (the process's other
    work, tests in the same process included, is left as it was)."""
    before = enable_determinism(warn_only)
    try:
        yield
    finally:
        restore_determinism(before)
