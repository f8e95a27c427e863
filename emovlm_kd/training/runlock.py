"""One writer per run folder: `RUN/.lock`, an OS lock held for the whole run.

    with hold_run_lock(run_dir):      # raises RunFolderBusy when another run holds RUN
        ...                           # write in RUN

The lock is `fcntl.flock` (exclusive, non-blocking) on the open file `RUN/.lock`: the OS releases it when the
process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock behind. The file holds
the holder's pid, host and start time, for the message a refused run prints; it is never deleted (deleting a
flock-ed file would let two runs lock two different files of one name). It lies in RUN itself, beside the stage
folders, never inside RUN/model.

Under torchrun / accelerate launch the processes of one launch share the lock: the main process takes it and tells
the others whether it got it (all of them go on, or all raise `RunFolderBusy`); a second launch's main process is
refused. A process that holds the lock already holds it again without asking (the command line may take it before
the training code is imported, and `run_training` takes it again). Where `fcntl` does not exist (Windows) there is
no lock, and one warning says so.

`ablate` and `evaluate` take the lock of the run folder they write into (`hold_run_locks_of`: the folder holding
`train_config.json` or a `.lock` of ours at or above each path), so that they and a training run never write there
at once.
"""

import contextlib
import errno
import logging
import os
import re
import socket
import time
from pathlib import Path

from emovlm_kd.distributed import main_process_decides
from emovlm_kd.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_CONFIG = "train_config.json"  # written at a run's start (under the lock)
HOLDER_LINE = re.compile(r"^pid \d+ on .*, since \d{4}-\d\d-\d\d ")  # what `acquire` writes in LOCK_FILE
_HELD = {}  # resolved run folder -> this process's open lock file (None on the other processes of a launch)


class RunFolderBusy(UsageError):
    """Another process holds the run folder's lock (the command exits with status 2 and this message)."""


@contextlib.contextmanager
def hold_run_lock(run_dir, purpose=None):
    """Hold `run_dir/.lock` (the folder is created if needed) until the block ends; `RunFolderBusy` at once, in
    every process of the launch, when another run holds it. `purpose` (e.g. "emovlm-kd ablate") is added to the
    holder's line, for the message a refused run prints."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:  # this process holds it already: held once more, released by the outer holder
        yield
        return
    taken = {}

    def take():  # on the main process only: None when taken, else why not
        taken["file"], refusal = acquire(run_dir, purpose)
        return refusal

    refusal = main_process_decides(take)
    if refusal:
        raise RunFolderBusy(refusal)
    _HELD[key] = taken.get("file")
    try:
        yield
    finally:
        handle = _HELD.pop(key)
        if handle is not None:
            handle.close()  # closing the last descriptor releases the lock


def acquire(run_dir, purpose=None):
    """(the open, locked lock file, None), or (None, the refusal message) when another process holds it; (None,
    None) where the platform or file system cannot lock (one warning)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    if fcntl is None:
        logger.warning("%s: no file locking on this platform; a second run on this folder is not prevented", path)
        return None, None
    if path.is_dir() or path.is_symlink():
        return None, f"{path} is not a lock file of this project: move it, or choose another --output-dir"
    handle = open(path, "a+", encoding="utf-8")  # "a+": created if missing, never truncated before it is ours
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = read_holder(handle)
        handle.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None, (f"{run_dir} is in use by another training run ({holder}): wait for it to end, or choose "
                          "another --output-dir")
        logger.warning("%s: cannot lock (%s); a second run on this folder is not prevented", path, error)
        return None, None
    handle.seek(0)
    if handle.read(1) and not HOLDER_LINE.match(read_holder(handle)):  # a file of the user's, named .lock
        handle.close()
        return None, (f"{path} is not a lock file of this project (it holds other text): move it, or choose another "
                      "--output-dir")
    handle.seek(0)
    handle.truncate()
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    handle.write(holder + (f", {purpose}" if purpose else "") + "\n")
    handle.flush()
    return handle, None


def read_holder(handle):
    """Who holds the lock, as its holder wrote it ("pid N on HOST, since TIME")."""
    handle.seek(0)
    return handle.read().strip() or "holder unknown"


def run_folder_of(path):
    """The training run folder `path` is or lies in (the nearest folder at or above it holding `train_config.json`
    or a `.lock` of ours: another tool's `.lock`, pytest's say, is not), or None."""
    path = Path(path).resolve()
    return next((folder for folder in [path, *path.parents] if is_run_folder(folder)), None)


def is_run_folder(folder):
    if (folder / RUN_CONFIG).is_file():
        return True
    try:
        with open(folder / LOCK_FILE, encoding="utf-8", errors="replace") as handle:
            return HOLDER_LINE.match(handle.readline(200)) is not None
    except OSError:
        return False


@contextlib.contextmanager
def hold_run_locks_of(*paths, purpose=None):
    """The lock of every run folder that one of `paths` is or lies in (`run_folder_of`), held until the block
    ends; `RunFolderBusy` (the message `train` gives) when another process holds one. Paths in no run folder take
    no lock."""
    folders = sorted({folder for folder in map(run_folder_of, paths) if folder is not None})
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(hold_run_lock(folder, purpose))
        yield
