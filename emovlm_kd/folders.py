"""Every write of this project that must be all or nothing, and the one temp-name pattern they share.

    atomic_write(path, write, mode="w")        a file written through `write(handle)`, put in place by one rename
    atomic_write_text(path, text)
    with staged_file(path) as tmp: ...         a file that another library writes by name (safetensors' save_file)
    with staged_folder(target) as tmp: ...     a folder written whole (save_pretrained), then put in place of target
    replace_folder(new, target)                the renames that put a finished folder in place of another

Names. A temp file or folder is `.NAME.emovlm-kd-PID-TOKEN.tmp` beside NAME; a folder moved aside while its new
version takes its place is `.NAME.emovlm-kd-PID-TOKEN.old` (PID the writer's process id, TOKEN 8 random hex
digits). `PARTIAL_WRITE` matches both, and no name a user picks by chance. A leftover (its writer was killed) is
removed only when its name matches and its process is gone (`is_leftover`): by the next write of the same NAME
(`remove_leftovers`) and at a run's start (`remove_partial_writes`). Nothing else is ever removed or replaced here:
a folder is replaced as a whole only after its caller checked that it holds nothing but its own files
(`bundle_conflicts`, `folder_conflicts`).

Errors (`write_error`, the one rule of every writer here and of `predict`'s part files). An OS error while
writing names the final path, never a temp name, and is one of two kinds: a path problem (`PATH_ERRORS`: no
permission, a read-only file system, a missing folder, a folder where a file goes ...: the user's to fix) stays a
plain `OSError` of its errno; a failure of the disk (full, an I/O error, a quota, ...) is `WriteError`, an
`OSError` whose `str()` is one line naming the path and the errno. The command line prints either as one line and
exits with status 1; `predict` refuses an `--output` whose path is the problem as a usage error (status 2). The temp
file or folder is removed and the final name keeps what it held before. safetensors' error that carries an OS error
("... (os error 28)") and torch.save's failed write are handled alike.
"""

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from emovlm_kd.errors import few

TEMP_TAG = "emovlm-kd"
# `.NAME.emovlm-kd-PID-TOKEN.tmp` (a file or folder being written) and `.NAME.emovlm-kd-PID-TOKEN.old` (a folder
# moved aside while its new version takes its place)
PARTIAL_WRITE = re.compile(r"^\.(?P<name>.+)\." + TEMP_TAG
                           + r"-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})\.(?P<kind>tmp|old)$")
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an OS error
# how torch.save's zip writer reports a failed write (no errno): "unexpected pos 23680 vs 23572" (a full disk),
# "PytorchStreamWriter failed writing file data/0: file write failed"
TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing")
NEARLY_FULL = 16 << 20  # bytes free under which a write failure without an errno is taken for a full disk
# errors that say the path is wrong (the user's to fix), not that the disk failed
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG}


class WriteError(OSError):
    """An OS error while writing `filename` (the final name, never the temp file's); `str()` is one line."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror} ({errno_name(self.errno)})"


def write_error(error, path):
    """The error to raise for OS error `error` (or `(errno, strerror)`) while writing `path`: a path problem
    (`PATH_ERRORS`) as a plain `OSError` of its errno (`PermissionError`, ...), a disk's failure (ENOSPC, EIO,
    EDQUOT, ...) as `WriteError`; both name `path`."""
    number, strerror = (error.errno, error.strerror) if isinstance(error, OSError) else error
    return (OSError if number in PATH_ERRORS else WriteError)(number, strerror, str(path))


def errno_name(number):
    """'errno 28, ENOSPC'."""
    return f"errno {number}, {errno.errorcode.get(number, '?')}"


# ----------------------------------------------------------------------------------------------------------------
# Temp names and leftovers
# ----------------------------------------------------------------------------------------------------------------


def temp_path(path, kind="tmp"):
    """A fresh `.NAME.emovlm-kd-PID-TOKEN.<kind>` beside `path` (kind "tmp" or "old")."""
    path = Path(path)
    return path.with_name(f".{path.name}.{TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def is_partial_write(name):
    """Whether `name` (a file or folder name) is one of our temp or backup names."""
    return PARTIAL_WRITE.match(str(name)) is not None


def is_leftover(name):
    """Whether `name` is our temp or backup name and the process that made it is gone (killed mid-write)."""
    match = PARTIAL_WRITE.match(str(name))
    return match is not None and process_gone(int(match["pid"]))


def process_gone(pid):
    """Whether no process `pid` runs (on this host); False for this process and where it cannot be told."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def remove(path):
    """Remove a file, a link or a folder of ours."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(path):
    """Remove the leftovers of killed writes of `path` beside it (`.NAME.emovlm-kd-PID-TOKEN.tmp/.old` of a process
    that is gone); the names removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for entry in path.parent.glob(f".*.{TEMP_TAG}-*"):
        match = PARTIAL_WRITE.match(entry.name)
        if match and match["name"] == path.name and process_gone(int(match["pid"])):
            remove(entry)
            removed.append(entry.name)
    return removed


def remove_partial_writes(folder):
    """Remove every leftover of a killed write under `folder` (files and folders named by `PARTIAL_WRITE` whose
    process is gone; a cache's can be gigabytes); the paths removed. Nothing else is touched."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            if is_leftover(name):
                remove(Path(root) / name)
                removed.append(Path(root) / name)
        dirs[:] = [name for name in dirs if not is_partial_write(name)]
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def os_error_in(error):
    """`(errno, strerror)` of the OS error that `error` is or carries (safetensors: "... (os error 28)"), or None."""
    if isinstance(error, OSError) and error.errno:
        return error.errno, error.strerror or os.strerror(error.errno)
    match = OS_ERROR_IN_TEXT.search(str(error))
    if match and not isinstance(error, OSError):
        number = int(match[1])
        return number, os.strerror(number)
    return None


def describe_os_error(error):
    """One line for an OS error that reached the command line: `WriteError`'s own, else the file, what went wrong
    and the errno; None when `error` neither is nor carries one."""
    if isinstance(error, WriteError):
        return str(error)
    found = os_error_in(error)
    if found is None:
        return None
    number, strerror = found
    files = _file_names(error)
    where = f"{' -> '.join(map(str, files))}: " if files else "a file operation failed: "
    return f"{where}{strerror} ({errno_name(number)})"


def _file_names(error):
    """The file names an OS error carries (`filename`, `filename2`), none for other errors."""
    return [f for f in (getattr(error, "filename", None), getattr(error, "filename2", None)) if f is not None]


def _failed_torch_write(error, path):
    """`(errno, strerror)` for torch.save's failed write (it gives no errno): ENOSPC when the disk of `path` is
    (nearly) full, else EIO. None for any other error."""
    if not isinstance(error, RuntimeError) or not TORCH_WRITE_FAILED.search(str(error)):
        return None
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        full = shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        full = False
    number = errno.ENOSPC if full else errno.EIO
    return number, os.strerror(number) + ("" if full else f" (torch.save: {str(error).strip()[:120]})")


def _within(file, paths):
    file = os.path.abspath(os.fsdecode(file))
    return any(file == str(p) or file.startswith(str(p) + os.sep) for p in map(os.path.abspath, paths))


@contextlib.contextmanager
def writing(path, *own):
    """OS errors of the block become `write_error`'s naming `path`: those without a file name (a full disk as
    `write()` reports it, safetensors' errors) and those about `path` or one of `own` (its temp file or folder,
    files written inside it included: the user hears of the folder, not of our temp names). An OS error about
    another file (a source being copied) is left as it is."""
    try:
        yield
    except Exception as error:
        found = os_error_in(error) or _failed_torch_write(error, path)
        if found is None:
            raise
        files = _file_names(error)
        # a WriteError comes from a writer inside the block: renamed only when it names our temp path
        ours = own if isinstance(error, WriteError) else (path, *own)
        if files and not all(_within(f, ours) for f in files):
            raise
        raise write_error(found, path) from error


def refuse_folder(path):
    """`IsADirectoryError` (a path problem, `write_error`) when `path`, a file to write, is a folder (the user's:
    never replaced)."""
    path = Path(path)
    if path.is_dir():
        raise write_error((errno.EISDIR, "it is a folder, not a file (move it or choose another name)"), path)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def default_file_mode():
    """The mode `open()` gives a new file under this process's umask: 0o644 under umask 022."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def respect_umask(*paths, only_private=False):
    """Give every file in `paths` (files, or folders searched recursively; symlinks left alone) the mode a new file
    gets under the umask. safetensors (0.8) writes through a temporary file, created 0600, and renames it into
    place: its files (weights, caches, checkpoints) would otherwise stay readable by their owner alone.
    `only_private` changes only files at 0600 (what such writers leave), so other modes someone chose are kept."""
    mode = default_file_mode()
    for path in map(Path, paths):
        if not path.exists():
            continue
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
        for file in files:
            try:
                current = file.lstat().st_mode & 0o777
                if not file.is_symlink() and current != mode and (current == 0o600 or not only_private):
                    file.chmod(mode)
            except FileNotFoundError:  # removed meanwhile (a stale cache, an old checkpoint)
                continue


def atomic_write(path, write, mode="w"):
    """Write `path` through `write(handle)` into a temp file beside it, then `os.replace` it into place: `path`
    holds its old bytes or the new ones, never a part. An OS error is raised as `write_error` makes it (nothing left
    behind); `IsADirectoryError` when `path` is a folder."""
    with staged_file(path) as tmp, open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
        write(handle)
    return Path(path)


def atomic_write_text(path, text):
    """`text` (UTF-8) written to `path` all or nothing (`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(text))


@contextlib.contextmanager
def staged_file(path, fsync=False):
    """A temp path beside `path` for a library that writes a file by name; when the block ends the file gets the
    umask's mode (safetensors creates 0600), is flushed to the disk with `fsync` (so that a file in place is whole
    after a crash: `predict`'s Parquet row groups, which `--resume` counts) and replaces `path`. On an error it is
    removed (an OS error as `write_error`); `path` keeps its old bytes."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path, tmp):
        refuse_folder(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.chmod(tmp, default_file_mode())
            if fsync:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(target):
    """A new, empty temp folder beside `target` to write into; when the block ends it replaces `target`
    (`replace_folder`). On an error it is removed (an OS error as `write_error`) and `target` is left as it was.
    Leftovers of killed writes of `target` are removed first. The caller checks that `target` may be replaced."""
    target = Path(target)
    tmp = temp_path(target)
    with writing(target, tmp):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        tmp.mkdir()
        try:
            yield tmp
            replace_folder(tmp, target)
        except BaseException:
            remove(tmp)
            raise


def replace_folder(new, target):
    """Put folder `new` at `target` by renames on one file system: an old `target` is first moved aside (to
    `.NAME.emovlm-kd-PID-TOKEN.old`) and removed once `new` is in place. `target` thus holds the old files or the
    new ones, never a mix; a kill between the two renames leaves it absent and the old set aside (removed as a
    leftover later); a failed second rename puts the old set back."""
    new, target = Path(new), Path(target)
    old = temp_path(target, "old") if target.exists() or target.is_symlink() else None
    if old is not None:
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)
        raise
    if old is not None:
        remove(old)
    return target


def folder_conflicts(folder, files=(), folders=None):
    """What in `folder` a writer that replaces it as a whole did not write, sorted ([] for a missing folder; the
    folder's own name when it is a file). `files`: the names it writes as files (one that is a folder is the
    user's); `folders`: {name: predicate(path) -> bool} for its subfolders, true for a file it writes there.
    Leftovers of our killed writes (`PARTIAL_WRITE`) are ours."""
    folder, folders = Path(folder), folders or {}
    if not folder.is_dir():
        return [folder.name] if folder.exists() or folder.is_symlink() else []
    conflicts = []
    for entry in folder.iterdir():
        name, is_dir = entry.name, entry.is_dir() and not entry.is_symlink()
        if name in folders:
            conflicts += [name] if not is_dir else [f"{name}/{p.name}" for p in entry.iterdir()
                                                    if p.is_dir() or not folders[name](p)]
        elif name in files or is_partial_write(name):
            conflicts += [f"{name}/ (a folder)"] if is_dir else []
        else:
            conflicts.append(name)
    return sorted(conflicts)


# what `hub.save_bundle` writes: a folder holding anything else is the user's and is never replaced without
# `overwrite`
BUNDLE_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "scoring_emovlm_kd.py",
    "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "README.md", "splits.json",
}
EXAMPLES_FOLDER = "examples"  # in a bundle: the widget's and the demo's example images (emovlm_kd.data.examples)
BUNDLE_FOLDERS = {EXAMPLES_FOLDER: lambda path: path.suffix == ".png"}
SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def check_bundle_folder(folder, overwrite=False):
    """`FileExistsError` naming what in `folder` a bundle does not consist of (`bundle_conflicts`: the user's files,
    a bundle file's name taken by a folder), unless `overwrite`. Imports nothing heavy (`emovlm-kd tiny` checks its
    output before torch is imported)."""
    foreign = [] if overwrite else bundle_conflicts(folder)
    if foreign:
        raise FileExistsError(f"{folder} holds files this project did not write ({few(foreign)}): choose another "
                              "folder, or overwrite it on purpose (--overwrite)")


def bundle_conflicts(folder):
    """Names in `folder` that a bundle does not consist of (`folder_conflicts` with the bundle's files, weight
    shards and `examples/*.png`; [] for a missing or empty folder)."""
    folder = Path(folder)
    shards = {p.name for p in folder.glob("model-*.safetensors")} if folder.is_dir() else set()
    return folder_conflicts(folder, BUNDLE_FILES | {s for s in shards if SHARD.match(s)}, BUNDLE_FOLDERS)


def bundle_examples(name_or_path):
    """The example images a bundle's folder holds (`examples/*.png`, as the export writes them), sorted; [] for a Hub
    id, or a folder without them."""
    source = Path(name_or_path or "") / EXAMPLES_FOLDER
    return sorted(source.glob("*.png")) if name_or_path and source.is_dir() else []
