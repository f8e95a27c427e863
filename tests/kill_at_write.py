"""Test-only: run the `emovlm-kd` command line and SIGKILL it at a chosen file-system event under a run folder,
optionally after cutting the file it had just written to half its bytes (what a kill mid-write leaves).

`run_cli(argv, run_dir, log_path, targets, output_path)` is the body of a child process (the kill-anywhere test
forks it from a `multiprocessing` forkserver that has imported `PRELOAD`, so a restart costs no imports); by hand:

    KILL_RUN_DIR=RUN KILL_LOG=events.jsonl KILL_AT='[...]' python tests/kill_at_write.py train --config RUN.yaml

- Only events on paths under the run folder count.
- The log (JSON lines) gets one line per event, `{"n", "kind", "path", "occurrence"}`, and `{"killed": <that
  event>, "target": <the target it matched>}` just before the kill.
- `targets` (none: record only): the process dies at the first event matching any of them, each either `{"kind",
  "path", "occurrence", "mode"}` or `{"n", "mode"}` (the n-th event of this process); `mode` is "after" (the
  operation done) or "half" (a written file cut to half its length first).

Events, each recorded after its operation: "write" (a file closed after writing through `open`, written by
`torch.save` or by safetensors), "mkdir", "rename" (`os.rename` / `os.replace`: the destination) and "delete"
(`os.unlink` / `os.remove` / `os.rmdir`, `shutil.rmtree` included). Paths are relative to the run folder, with
16-hex-digit fingerprints written `KEY` and the process id and random token of our temp names
(`.NAME.emovlm-kd-PID-TOKEN.tmp`, `emovlm_kd.folders`) written `PID` (`normalise`), so the same point of two runs has
the same name.
"""

import builtins
import io
import json
import os
import re
import signal
import sys


def normalise(path, run_dir):
    """`path` relative to `run_dir`, fingerprints as KEY and temp names' process ids and tokens as PID
    (`.model.emovlm-kd-123-0a1b2c3d.tmp/config.json` -> `.model.emovlm-kd-PID.tmp/config.json`)."""
    relative = os.path.relpath(path, run_dir)
    relative = re.sub(r"(?<=-)[0-9a-f]{16}(?=\b|_)", "KEY", relative)
    return re.sub(r"\.emovlm-kd-\d+-[0-9a-f]{8}\.(tmp|old)(?=/|$)", r".emovlm-kd-PID.\1", relative)


class Recorder:
    """Counts the events under the run folder, logs each, and kills this process at the first event a target
    matches."""

    def __init__(self, run_dir, log_path, targets=()):
        self.run_dir = os.path.realpath(run_dir)
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.targets, self.n, self.counts = list(targets or ()), 0, {}

    def resolve(self, path, dir_fd=None):
        """The real absolute path of `path` (relative to `dir_fd` where given), or None outside the run folder."""
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.realpath(path)
        return path if path.startswith(self.run_dir + os.sep) else None

    def log(self, record):
        os.write(self.log_fd, (json.dumps(record) + "\n").encode())

    def event(self, kind, path, dir_fd=None):
        path = self.resolve(path, dir_fd)
        if path is None:
            return
        name = normalise(path, self.run_dir)
        self.n += 1
        self.counts[kind, name] = occurrence = self.counts.get((kind, name), 0) + 1
        record = {"n": self.n, "kind": kind, "path": name, "occurrence": occurrence}
        self.log(record)
        for target in self.targets:
            if matches(target, record):
                self.kill(record, path, target)

    def kill(self, record, path, target):
        if target.get("mode") == "half" and record["kind"] == "write" and os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
        self.log({"killed": record, "target": target})
        os.kill(os.getpid(), signal.SIGKILL)


def matches(target, record):
    """Is the event `record` the one `target` names (by kind, path and occurrence, or by its number)?"""
    if "n" in target:
        return record["n"] == target["n"]
    return all(record[k] == target[k] for k in ("kind", "path", "occurrence"))


class TrackedFile:
    """A file opened for writing under the run folder: closing it is a "write" event."""

    def __init__(self, file, path, recorder):
        self._file, self._path, self._recorder = file, path, recorder

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __iter__(self):
        return iter(self._file)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if not self._file.closed:
            self._file.close()
            self._recorder.event("write", self._path)


def install(recorder):
    """Route the write, rename and delete primitives the run uses through `recorder`."""
    import safetensors.torch
    import torch

    real_open = builtins.open

    def tracked_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            path = recorder.resolve(file)
            if path is not None:
                return TrackedFile(handle, path, recorder)
        return handle

    def torch_saved(args, kwargs):  # torch.save(obj, f): a path, or a buffer (not a file event)
        file = args[1] if len(args) > 1 else kwargs.get("f")
        if isinstance(file, (str, os.PathLike)):
            recorder.event("write", file)

    builtins.open = io.open = tracked_open
    after(torch.serialization, "save", torch_saved)
    torch.save = torch.serialization.save
    after(safetensors.torch, "serialize_file", lambda args, kwargs: recorder.event("write", args[1]))
    for name in ("rename", "replace"):
        after(os, name, lambda args, kwargs: recorder.event("rename", args[1], kwargs.get("dst_dir_fd")))
    for name in ("unlink", "remove", "rmdir"):
        after(os, name, lambda args, kwargs: recorder.event("delete", args[0], kwargs.get("dir_fd")))
    after(os, "mkdir", lambda args, kwargs: recorder.event("mkdir", args[0], kwargs.get("dir_fd")))


def after(module, name, hook):
    """Replace `module.name` by a function that calls it, then `hook(args, kwargs)`."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        hook(args, kwargs)
        return result

    setattr(module, name, wrapper)


# what `emovlm-kd train` imports: a forkserver that has imported these starts a run in no time
PRELOAD = ["kill_at_write", "emovlm_kd.cli", "emovlm_kd.commands.train", "emovlm_kd.training.runner",
           "emovlm_kd.training.sft", "emovlm_kd.training.config", "trl.trainer.sft_trainer", "peft"]


def run_cli(argv, run_dir, log_path, targets, output_path):
    """The body of a child process: stdout and stderr to `output_path`, the primitives routed through a
    `Recorder`, then `emovlm-kd ARGV`; exits with its status (or dies at a target)."""
    output = os.open(output_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    install(Recorder(run_dir, log_path, targets))
    from emovlm_kd.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    install(Recorder(os.environ["KILL_RUN_DIR"], os.environ["KILL_LOG"],
                     json.loads(os.environ.get("KILL_AT") or "[]")))
    from emovlm_kd.cli import main

    sys.exit(main(sys.argv[1:]))
