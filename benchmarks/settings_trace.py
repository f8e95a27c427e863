"""How far the training settings travel: every call of the project's own code that receives a settings object,
followed from `run_training` through one demo training run (a fresh run folder, so every stage works).

    python -m benchmarks.settings_trace --output-dir /tmp/trace-run            # the figures, as JSON
    python -m benchmarks.settings_trace --output-dir /tmp/trace-run --calls    # and every stop, in order

What it counts (issue 23's measure, computed the same way before and after a change):

- a *stop* is one call, made by the project's own code (the calling frame is in this repository), of a function defined
  in this repository (tests and this file excepted) with a settings object among its arguments (positional,
  keyword, `*args` or `**kwargs`); a call that a library makes (a Trainer callback handed `args`, a dataclass's
  generated `__init__`) is not a settings hand-over of ours and does not count. A settings object: an instance of a
  dataclass defined in
  `emovlm_kd` whose class (or a base) is named `...Arguments`, `...Config` or `...Settings`, or a
  `transformers.TrainingArguments` subclass defined in `emovlm_kd`;
- *files*: the distinct files of the stops;
- a *climb back up*: a stop whose file lies on a higher floor than the project code that called it (floors: the Hub
  files 0, `emovlm_kd/*.py` 1, `emovlm_kd/data` 2, `emovlm_kd/training` and `emovlm_kd/evaluation` 3,
  `emovlm_kd/commands` 4, `emovlm_kd/cli.py` 5);
- a *return to a file already left*: a stop in a file that an earlier stop was in, when the stop just before it was in
  another file;
- *entries* per file: how many times the sequence of stops enters that file.

`sys.setprofile` sees every Python call, so the run is slower than an untraced one; the figures do not depend on
speed.
"""

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB_FILES = {"configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "scoring_emovlm_kd.py"}
SETTINGS_SUFFIXES = ("Arguments", "Config", "Settings")


def floor(relative):
    """The floor of a repository file (None outside the package and the Hub files)."""
    parts = Path(relative).parts
    if relative in HUB_FILES:
        return 0
    if not parts or parts[0] != "emovlm_kd":
        return None
    if len(parts) == 2:
        return 5 if parts[1] == "cli.py" else 1
    return {"data": 2, "training": 3, "evaluation": 3, "commands": 4}.get(parts[1], 1)


def is_settings(value):
    kind = type(value)
    if not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return False
    return any(klass.__module__.startswith("emovlm_kd") and klass.__name__.endswith(SETTINGS_SUFFIXES)
               for klass in kind.__mro__)


def _carries_settings(frame):
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:count])
    if code.co_flags & 0x04:  # *args
        names.append(code.co_varnames[count])
        count += 1
    if code.co_flags & 0x08:  # **kwargs
        names.append(code.co_varnames[count])
    local = frame.f_locals
    for name in names:
        value = local.get(name)
        if is_settings(value):
            return True
        if isinstance(value, tuple) and any(is_settings(v) for v in value):
            return True
        if isinstance(value, dict) and any(is_settings(v) for v in value.values()):
            return True
    return False


def _relative(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return None


def trace(function, *args, **kwargs):
    """`(result, stops)`: `function(*args, **kwargs)` run under the profiler; each stop `(file, function, caller file)`."""
    stops, known = [], {}
    this = str(Path(__file__).resolve())

    def ours(filename):
        if filename not in known:
            real = filename.endswith(".py") and filename != this  # not `<string>` (generated code), not this file
            relative = _relative(filename) if real else None
            known[filename] = relative if relative and not relative.startswith(("tests", "benchmarks")) else None
        return known[filename]

    def profiler(frame, event, arg):
        if event != "call":
            return
        relative = ours(frame.f_code.co_filename)
        caller = frame.f_back
        by = caller.f_code.co_filename if caller is not None else None
        if relative is None or by is None or (by != this and ours(by) is None):
            return  # not ours, or called by a library (or the interpreter), not by our code or this trace
        if _carries_settings(frame):
            stops.append((relative, frame.f_code.co_qualname, ours(by)))

    sys.setprofile(profiler)
    try:
        result = function(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return result, stops


def figures(stops):
    """The counts described in the module docstring."""
    files = [stop[0] for stop in stops]
    entries, returns, seen = Counter(), 0, set()
    for i, name in enumerate(files):
        if i == 0 or files[i - 1] != name:
            entries[name] += 1
            if name in seen:
                returns += 1
        seen.add(name)
    climbs = sum(1 for name, _, caller in stops
                 if caller is not None and floor(caller) is not None and floor(name) is not None
                 and floor(name) > floor(caller))
    return {
        "stops": len(stops),
        "functions": len({(name, function) for name, function, _ in stops}),
        "files": len(set(files)),
        "climbs_back_up": climbs,
        "returns_to_a_file_already_left": returns,
        "entries": dict(entries.most_common()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="a fresh run folder for the demo run (must not exist)")
    parser.add_argument("--calls", action="store_true", help="print every stop too")
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists():
        parser.error(f"--output-dir {args.output_dir} exists: give a fresh folder (every stage must run)")

    from emovlm_kd.logs import setup_logging
    from emovlm_kd.training.config import parse_train_args
    from emovlm_kd.training.runner import run_training

    setup_logging("WARNING")
    cfg = parse_train_args(["--output-dir", args.output_dir])
    _, stops = trace(run_training, cfg)
    report = figures(stops)
    if args.calls:
        report["calls"] = [f"{name}:{function} <- {caller}" for name, function, caller in stops]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
