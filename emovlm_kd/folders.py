"""Replacing a whole folder at once: `replace_folder`, shared by the Hub export (`hub.save_bundle`) and the
evaluation report (`evaluation.runner.write_outputs`)."""

import shutil
from pathlib import Path


def replace_folder(new, target):
    """Put folder `new` at `target` by renames on one file system: an old `target` is first moved aside to
    `.NAME.old` (one a killed run left is removed) and removed once `new` is in place. `target` thus holds the old
    files or the new ones, never a mix; a kill between the two renames leaves it absent, the old set in
    `.NAME.old`; a failed second rename puts the old set back."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
