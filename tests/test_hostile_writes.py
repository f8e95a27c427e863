"""What we write never costs a user a file (issue 22, items 1, 5, 6; issue 21, item 4's `tiny` part).

- Only what this project wrote is removed or replaced: temp and backup names are `.NAME.emovlm-kd-PID-TOKEN.tmp`
  / `.old` (`emovlm_kd.folders`), never a user's `NAME.tmp` or `.NAME.old`; output names taken by a user's folder
  are refused (exit 2) before any work.
- A full disk (and any OS error on write) is one line naming the path and the errno, exit 1, with nothing
  half-written left behind: tested with a write wrapper that fails as a full disk does (`OSError(28)` from
  `write()`, without a file name, as a 30 MB tmpfs gives it; safetensors' "... (os error 28)").
- `ablate` and `evaluate` writing into a run folder take its lock (RUN/.lock).
- `emovlm-kd tiny DIR` into a folder holding a user file refuses before torch or transformers is imported.
"""

import builtins
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import imported_by_a_child
from safetensors import SafetensorError

from test_run_integrity import child_env, lock_held_by_another_process
from test_outputs import dataset_dir, dead_pid, evaluate  # noqa: F401 (dataset_dir: a fixture)

from emovlm_kd import folders
from emovlm_kd.cli import main

REPO = Path(__file__).resolve().parents[1]


def user_files(root):
    """{relative path: sha256} of every file under `root` (the user's, compared byte for byte after a command)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def plant(root, files):
    """Write the user's `files` ({relative path: text}) under `root`; their fingerprint (`user_files`)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}


def surviving(root, files):
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in files if (root / name).is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Only what we wrote is removed or replaced
# ---------------------------------------------------------------------------------------------------------------


def test_a_report_name_taken_by_a_user_folder_is_refused_before_any_work(tiny_bundle_dir, dataset_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "ud4"
    planted = plant(out, {"report.json/mine.txt": "my notes\n"})
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        evaluate(tiny_bundle_dir, dataset_dir, out)
    assert exited.value.code == 2 and time.perf_counter() - started < 10
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "report.json/ (a folder)" in error and str(out) in error
    assert user_files(out) == planted


def test_evaluate_leaves_the_users_folders_beside_its_output_alone(tiny_bundle_dir, dataset_dir, tmp_path):
    res = tmp_path / "res"
    planted = plant(res, {".fi.old/a.txt": "old results\n", ".fi.tmp/b.txt": "drafts\n", "fi.tmp/c.txt": "more\n"})
    assert evaluate(tiny_bundle_dir, dataset_dir, res / "fi") == 0
    assert evaluate(tiny_bundle_dir, dataset_dir, res / "fi") == 0  # replacing its own report: same
    assert surviving(res, planted) == planted
    assert sorted(p.name for p in res.iterdir()) == [".fi.old", ".fi.tmp", "fi", "fi.tmp"]  # nothing of ours left
    assert json.loads((res / "fi" / "report.json").read_text())["num_samples"] == 8


def test_tiny_leaves_the_users_folders_beside_its_output_alone(tmp_path, capsys):
    planted = plant(tmp_path, {"mymodel.tmp/thesis.txt": "chapter 1\n", ".mymodel.old/draft.txt": "chapter 0\n"})
    assert main(["tiny", str(tmp_path / "mymodel")]) == 0
    assert main(["tiny", str(tmp_path / "mymodel")]) == 0  # a bundle replacing a bundle: the old one moved aside
    assert surviving(tmp_path, planted) == planted
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mymodel.old", "mymodel", "mymodel.tmp"]
    assert (tmp_path / "mymodel" / "model.safetensors").is_file()


def test_the_training_export_leaves_the_users_folders_beside_the_model_alone(tiny_bundle, tmp_path):
    from emovlm_kd.hub import save_bundle

    model, processor = tiny_bundle
    run = tmp_path / "run"
    planted = plant(run, {"model.tmp/notes.txt": "mine\n", ".model.old/notes.txt": "mine too\n",
                          ".model.tmp/x.txt": "and this\n"})
    save_bundle(model, processor, run / "model")
    save_bundle(model, processor, run / "model")  # the export rewritten (a rerun after damage)
    assert surviving(run, planted) == planted
    assert sorted(p.name for p in run.iterdir()) == [".model.old", ".model.tmp", "model", "model.tmp"]


@pytest.mark.parametrize("planted", [{"config.json/notes.txt": "a folder named as a bundle file\n"},
                                     {"examples/thesis.txt": "not an example image\n"},
                                     {"examples": "a file where the bundle has a folder\n"}])
def test_a_bundle_name_taken_by_something_of_the_users_is_refused(tmp_path, capsys, planted):
    out = tmp_path / "mymodel"
    expected = plant(out, planted)
    with pytest.raises(SystemExit) as exited:
        main(["tiny", str(out)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out} holds files this project did not write" in error
    assert next(iter(planted)).split("/")[0] in error
    assert user_files(out) == expected


def test_leftovers_are_removed_only_when_their_writer_is_gone_and_their_name_is_ours(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    ours = [tmp_path / f".model.emovlm-kd-{gone}-0123abcd.tmp", tmp_path / f".model.emovlm-kd-{gone}-89abcdef.old"]
    for folder in ours:
        plant(folder, {"model.safetensors": "weights\n"})
    planted = plant(tmp_path, {f".model.emovlm-kd-{alive}-0123abcd.tmp/f": "being written by a live process\n",
                               f".other.emovlm-kd-{gone}-0123abcd.tmp/f": "another name's: left to its writer\n",
                               "model.tmp/f": "user\n", ".model.old/f": "user\n",
                               f".model.emovlm-kd-{gone}.tmp/f": "not our pattern\n"})
    with folders.staged_folder(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert not any(p.exists() for p in ours)
    assert surviving(tmp_path, planted) == planted
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]


# ---------------------------------------------------------------------------------------------------------------
# A full disk: one line naming the path and the errno, exit 1, nothing half-written
# ---------------------------------------------------------------------------------------------------------------


class FullDisk:
    """A file whose writes fail as on a full disk: `write()` raises `OSError(28)` without a file name (what a
    30 MB tmpfs gives)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@contextmanager
def full_disk_under(root, monkeypatch):
    """Files opened for writing under `root` fail as on a full disk (the rest of the process writes as usual)."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(str(root) + os.sep)
        return FullDisk(handle) if inside and any(c in mode for c in "wax") else handle

    monkeypatch.setattr(builtins, "open", open_)
    yield
    monkeypatch.setattr(builtins, "open", real_open)


def test_a_full_disk_while_writing_the_report_is_one_line_exit_1_and_nothing_half_written(
        tiny_bundle_dir, dataset_dir, tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    with full_disk_under(disk, monkeypatch):
        code = evaluate(tiny_bundle_dir, dataset_dir, disk / "results")
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"emovlm-kd: cannot write {disk / 'results'}: No space left on device (errno 28, ENOSPC)"]
    assert list(disk.iterdir()) == []  # no report, no temp folder a rerun could trust


def test_a_full_disk_in_safetensors_is_one_line_exit_1_and_the_old_bundle_is_kept(tmp_path, monkeypatch, capsys):
    """As `train`'s adapter merge and export meet it: `SafetensorError(... (os error 28))` from save_pretrained."""
    import transformers.modeling_utils

    out = tmp_path / "mymodel"
    assert main(["tiny", str(out)]) == 0
    before = user_files(out)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    capsys.readouterr()
    assert main(["tiny", str(out), "--seed", "1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emovlm-kd: cannot write {out}: No space left on device (errno 28, ENOSPC)"]
    assert user_files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mymodel"]


def test_a_full_disk_in_a_file_writer_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "splits.json"
    target.write_text("old")
    with full_disk_under(tmp_path, monkeypatch), pytest.raises(folders.WriteError) as failed:
        folders.atomic_write_text(target, "new")
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(target))
    assert str(failed.value) == f"cannot write {target}: No space left on device (errno 28, ENOSPC)"
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["splits.json"]


@pytest.mark.parametrize("number, kind", [(errno.ENOSPC, folders.WriteError), (errno.EIO, folders.WriteError),
                                           (errno.EACCES, PermissionError), (errno.EROFS, OSError)])
@pytest.mark.parametrize("writer", ["staged_file", "staged_folder", "parquet"])
def test_one_rule_for_an_os_error_while_writing_a_path_problem_or_the_disks_failure(writer, number, kind, tmp_path,
                                                                                    monkeypatch):
    """`folders.write_error`, for every writer (the atomic ones and predict's Parquet row groups): a path problem
    (the user's to fix) stays a plain OSError of its errno, a disk's failure is `WriteError`; both name the final
    path, never the temp name, and leave nothing behind."""
    target = tmp_path / ("out.parquet.part" if writer == "parquet" else "target")

    def fail(*args, **kwargs):  # the library's write meets the OS error, naming the temp file it writes
        raise OSError(number, os.strerror(number), str(args[-1]))

    if writer == "parquet":
        import pyarrow.parquet as pq

        from emovlm_kd.parquetout import ParquetParts

        parts = ParquetParts(tmp_path / "out.parquet", "path", {0: "negative", 1: "positive"},
                             record={"inputs": {}, "model": "m", "settings": {}}, row_group_size=1)
        monkeypatch.setattr(pq, "write_table", lambda table, where: fail(where))
        target, write = target / "rows-000000.parquet", lambda: parts.write([{"path": "a.png", "label": "negative"}])
    else:
        def write():
            with getattr(folders, writer)(target) as tmp:
                fail(tmp)
    with pytest.raises(OSError) as failed:
        write()
    assert type(failed.value) is kind and isinstance(failed.value, folders.WriteError) == (kind is folders.WriteError)
    assert (failed.value.errno, failed.value.filename) == (number, str(target))
    assert not [p for p in tmp_path.rglob("*") if folders.is_partial_write(p.name)]


@pytest.mark.parametrize("failure", [
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # the weights
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 23680 vs 23572"),  # torch.save's
], ids=["safetensors", "torch.save"])
def test_a_full_disk_while_the_trainer_saves_a_checkpoint_names_the_checkpoints_folder(tmp_path, monkeypatch,
                                                                                        failure):
    """What a 30 MB tmpfs gave `train` mid-stage: safetensors' "(os error 28)" or torch.save's zip writer error
    (no errno; a full disk when the disk has next to nothing free)."""
    from types import SimpleNamespace

    from emovlm_kd.training.stage import run_trainer

    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: SimpleNamespace(total=30 << 20, used=30 << 20,
                                                                                   free=4096))

    def train(resume_from_checkpoint=None):
        raise failure

    checkpoints = tmp_path / "stage1_sft" / "checkpoints-KEY"
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(checkpoints), logging_strategy="no"), train=train)
    monkeypatch.setattr("emovlm_kd.logs.route_trainer_logs", lambda trainer, log: None)
    with pytest.raises(folders.WriteError) as failed:
        run_trainer(trainer)
    assert str(failed.value) == f"cannot write {checkpoints}: No space left on device (errno 28, ENOSPC)"


def test_an_os_error_of_any_command_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from emovlm_kd.commands import split

    def unreadable(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "secret"))

    monkeypatch.setattr(split, "run", unreadable)
    assert main(["split", str(tmp_path), "--output", str(tmp_path / "s.json")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emovlm-kd: {tmp_path / 'secret'}: Permission denied (errno 13, EACCES)"]


# ---------------------------------------------------------------------------------------------------------------
# ablate and evaluate take the run lock
# ---------------------------------------------------------------------------------------------------------------



def test_ablate_on_a_run_folder_in_use_is_refused_with_the_message_train_gives(tmp_path, capsys):
    run = tmp_path / "run"
    plant(run, {"train_config.json": "{}"})
    with lock_held_by_another_process(run) as pid, pytest.raises(SystemExit) as exited:
        main(["ablate", "alpha", "--run", str(run), "--alphas", "0,1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {run} is in use by another training run (pid {pid} on " in error
    assert error.endswith("wait for it to end, or choose another --output-dir")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "train_config.json"]  # nothing written


def test_evaluate_into_a_run_folder_in_use_is_refused_with_the_message_train_gives(tiny_bundle_dir, dataset_dir,
                                                                                   tmp_path, capsys):
    run = tmp_path / "run"
    plant(run, {"train_config.json": "{}"})
    with lock_held_by_another_process(run) as pid, pytest.raises(SystemExit) as exited:
        evaluate(tiny_bundle_dir, dataset_dir, run / "eval")
    assert exited.value.code == 2
    assert f"error: {run} is in use by another training run (pid {pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "train_config.json"]


def test_ablate_and_evaluate_name_themselves_to_a_run_they_hold_off(tmp_path):
    from emovlm_kd.training.runlock import RunFolderBusy, hold_run_locks_of, run_folder_of

    run = tmp_path / "run"
    plant(run, {"train_config.json": "{}"})
    assert run_folder_of(run / "ablations" / "new") == run and run_folder_of(tmp_path / "elsewhere") is None
    script = ("import sys\nfrom emovlm_kd.training.runlock import hold_run_locks_of\n"
              "with hold_run_locks_of(sys.argv[1] + '/eval', purpose='emovlm-kd evaluate'):\n"
              "    print('held', flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(run)], env=child_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=r", emovlm-kd evaluate\)"), hold_run_locks_of(run):
            pass
    finally:
        child.kill()
        child.wait(timeout=60)


def test_ablate_refuses_a_table_name_taken_by_a_user_folder(tmp_path, capsys):
    run = tmp_path / "run"
    planted = plant(run, {"train_config.json": "{}", "ablations/alpha.json/mine.txt": "mine\n"})
    with pytest.raises(SystemExit) as exited:
        main(["ablate", "alpha", "--run", str(run)])
    assert exited.value.code == 2
    assert f"{run / 'ablations' / 'alpha.json'} is a folder" in capsys.readouterr().err
    assert user_files(run) == planted


# ---------------------------------------------------------------------------------------------------------------
# `tiny` refuses at once
# ---------------------------------------------------------------------------------------------------------------

TINY_REFUSAL = """
import sys, time
started = time.perf_counter()
from emovlm_kd.cli import main
try:
    main(["tiny", sys.argv[1]])
except SystemExit as exited:
    code = exited.code
print(code, round(time.perf_counter() - started, 3))
"""


def test_tiny_into_a_folder_holding_a_user_file_refuses_before_the_heavy_imports(tmp_path):
    out = tmp_path / "mine"
    planted = plant(out, {"thesis.txt": "chapter 1\n"})
    imported, result = imported_by_a_child(TINY_REFUSAL, args=[out])
    code, seconds = result.stdout.splitlines()[0].split()
    assert (code, imported) == ("2", []), result.stderr
    assert float(seconds) < 2.0  # ~0.1 s; torch and transformers alone take seconds
    assert f"{out} holds files this project did not write (thesis.txt)" in result.stderr
    assert user_files(out) == planted
