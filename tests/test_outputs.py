"""Results written all or nothing: `predict --output FILE` through `FILE.part` (renamed at the end, continued with
`--resume` after a kill), `predict | head` ending quietly, `evaluate`'s report set replacing its folder as a whole
and never a folder holding the user's files. Tiny bundle, a handful of images, CPU pinned (outputs are compared
byte for byte)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emovlm_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 6


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        pixels = np.random.default_rng(i).integers(0, 256, (36 + 4 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # a skipped input resumes like the others
    return folder


@pytest.fixture(scope="module")
def reference(tiny_bundle_dir, image_dir, tmp_path_factory):
    """The bytes of an uninterrupted `predict --output` run (exit status 1: one input skipped)."""
    out = tmp_path_factory.mktemp("reference") / "all.jsonl"
    assert predict(tiny_bundle_dir, image_dir, out) == 1
    return out.read_bytes()


# `--group-batches 1`: each batch of two is a window of its own, so `--resume` predicts exactly the missing inputs
# (with predict's default windows of 8 batches sorted by size, a resumed run computes again the rows before its start
# in the window that holds it, to get the same batches: tests/test_collections.py resumes those)
GROUPING = ["--group-batches", "1", "--num-workers", "0"]


def predict(model, inputs, output, *extra):
    return main(["predict", "--model", str(model), "--device", "cpu", "--batch-size", "2", *GROUPING, "--output",
                 str(output), str(inputs), *extra])


def child_env():
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths)}


KILLED_AT_THIRD_BATCH = """
import os, signal, sys
import emovlm_kd.inference as inference
from emovlm_kd.cli import main

real, calls = inference.run_batch, []

def run_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup code of ours runs
    return real(*args, **kwargs)

inference.run_batch = run_batch
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------------------------------------------ predict


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="SIGKILL")
def test_a_killed_predict_leaves_its_part_and_resume_gives_the_uninterrupted_file(tiny_bundle_dir, image_dir,
                                                                                  reference, tmp_path):
    out = tmp_path / "predictions.jsonl"
    out.write_text("an older, complete result\n")
    argv = ["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", "--batch-size", "2", *GROUPING,
            "--output", str(out), str(image_dir)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THIRD_BATCH, *argv], cwd=ROOT, env=child_env(),
                            check=False, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    part = Path(f"{out}.part")
    assert out.read_text() == "an older, complete result\n"  # untouched until the new file is complete
    assert len(part.read_text().splitlines()) == 4  # the first two batches
    assert reference.startswith(part.read_bytes())
    assert predict(tiny_bundle_dir, image_dir, out, "--resume") == 1
    assert out.read_bytes() == reference and not part.exists()


def interrupt_after(model, inputs, output, batches, monkeypatch, *extra):
    """`predict --output` stopped by Ctrl-C when its batch `batches + 1` starts: `FILE.part` (the first `batches`
    batches' lines) and `FILE.part.json` (what they were written for) are left for `--resume`."""
    import emovlm_kd.inference

    real, calls = emovlm_kd.inference.run_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", interrupted)
    assert predict(model, inputs, output, *extra) == 130
    monkeypatch.setattr(emovlm_kd.inference, "run_batch", real)
    assert Path(f"{output}.part.json").is_file()
    return Path(f"{output}.part")


def test_resume_drops_a_line_cut_short_and_predicts_only_what_is_missing(tiny_bundle_dir, image_dir, reference,
                                                                         tmp_path, monkeypatch):
    import emovlm_kd.inference

    lines = reference.splitlines(keepends=True)
    out = tmp_path / "predictions.jsonl"
    part = interrupt_after(tiny_bundle_dir, image_dir, out, 2, monkeypatch)
    assert part.read_bytes() == b"".join(lines[:4])
    with open(part, "ab") as handle:
        handle.write(lines[4][:25])  # a kill in the middle of line 5
    real, images_seen = emovlm_kd.inference.run_batch, []

    def counting(*args, **kwargs):
        output = real(*args, **kwargs)
        images_seen.append(len(output.logits))  # the images this model call predicted
        return output

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", counting)
    assert predict(tiny_bundle_dir, image_dir, out, "--resume") == 1
    assert out.read_bytes() == reference
    assert sum(images_seen) == len(lines) - 4 - 1  # lines 5.. again, the broken file's line without a model call
    assert not part.exists() and not Path(f"{out}.part.json").exists()


def other_model(bundle, tmp_path):
    """A copy of the bundle that predicts otherwise (another calibration temperature)."""
    import shutil

    copy = Path(shutil.copytree(bundle, tmp_path / "other_model"))
    config = json.loads((copy / "config.json").read_text())
    config["gate_calibration_temperature"] = 2.0
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def repeat_line_2(part):
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:3] + lines[1:2] + lines[3:]))


RESUME_REFUSED = {  # what differs at --resume, what the one line says
    "other inputs": (None, lambda images, model, tmp: ([images / "0.png", images / "1.png"], model, []),
                     "was written for other inputs than this run's"),
    "another model": (None, lambda images, model, tmp: ([images], other_model(model, tmp), []),
                      "was written for another model than this run's"),
    "other settings": (None, lambda images, model, tmp: ([images], model, ["--vlm-mode", "generate"]),
                       "was written for other settings than this run's"),
    "a repeated line": (repeat_line_2, lambda images, model, tmp: ([images], model, []),
                        "line 4 repeats"),
    "no record beside it": (lambda part: Path(f"{part}.json").unlink(),
                            lambda images, model, tmp: ([images], model, []),
                            "has no readable predictions.jsonl.part.json saying what it was written for"),
}


@pytest.mark.parametrize("case", list(RESUME_REFUSED))
def test_resume_refuses_a_part_written_for_another_run(case, tiny_bundle_dir, image_dir, tmp_path, capsys,
                                                       monkeypatch):
    """A `.part` is continued only for the inputs, model and settings it was written for (issue 22: a `.part` of
    other inputs gave "5 input(s) already written, 2 to go" and 7 lines for 2 inputs; duplicates 33 lines for 30)."""
    damage, run, says = RESUME_REFUSED[case]
    out = tmp_path / "predictions.jsonl"
    part = interrupt_after(tiny_bundle_dir, image_dir, out, 2, monkeypatch)
    if damage:
        damage(part)
    before = part.read_bytes()
    inputs, model, extra = run(image_dir, tiny_bundle_dir, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(model), "--device", "cpu", "--output", str(out), "--resume",
              *map(str, inputs), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--resume: {part}" in err and says in err, err[-2000:]
    assert "Traceback" not in err and "already written" not in err
    assert part.read_bytes() == before and not out.exists()


def test_a_non_finite_score_is_an_error_for_its_input_never_nan_in_json(tiny_bundle_dir, image_dir, tmp_path,
                                                                        monkeypatch, capsys):
    """A NaN in the model's output for one image: that input's line says so (counted skipped), the file stays JSON."""
    import emovlm_kd.inference

    real = emovlm_kd.inference.run_batch

    def nan_for_the_first(*args, **kwargs):
        output = real(*args, **kwargs)
        output["logits"] = output["logits"].clone()  # an inference tensor: changed on a copy
        output["logits"][0, 2] = float("nan")
        return output

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", nan_for_the_first)
    out = tmp_path / "predictions.jsonl"
    assert predict(tiny_bundle_dir, image_dir, out) == 1

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    records = [json.loads(line, parse_constant=no_constants) for line in out.read_text().splitlines()]
    errors = {Path(r["path"]).name: r["error"] for r in records if "error" in r}
    assert sorted(errors) == ["0.png", "2.png", "4.png", "broken.png"]  # the first of each batch of two, and broken
    assert "non-finite scores" in errors["0.png"]
    assert "predicted 3, skipped 4" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["output is a folder", "output's folder is missing", "an input is missing"])
def test_predict_refuses_before_loading_the_model(case, tiny_bundle_dir, image_dir, tmp_path, capsys, monkeypatch):
    """`--output adir` (a folder) and a missing input are usage errors found before any model loading or inference
    (issue 22: all inference, then IsADirectoryError and `adir.part` left; issue 21: "predicted 0, skipped 1")."""
    import emovlm_kd.hub

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(emovlm_kd.hub, "load_model", never)
    (tmp_path / "adir").mkdir()
    argv, says = {
        "output is a folder": (["--output", str(tmp_path / "adir"), str(image_dir)],
                               f"--output: {tmp_path / 'adir'} is a folder; give a file name"),
        "output's folder is missing": (["--output", str(tmp_path / "nope" / "p.jsonl"), str(image_dir)],
                                       f"--output: no such folder: {tmp_path / 'nope'}"),
        "an input is missing": ([str(image_dir), str(tmp_path / "missing_folder") + "/", str(tmp_path / "x.png")],
                                f"no such file or folder: {tmp_path / 'missing_folder'}/, {tmp_path / 'x.png'}"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not any((tmp_path / "adir").iterdir())


def test_without_resume_a_part_file_is_started_afresh(tiny_bundle_dir, image_dir, reference, tmp_path):
    out = tmp_path / "predictions.jsonl"
    Path(f"{out}.part").write_text('{"path": "stale"}\n')
    assert predict(tiny_bundle_dir, image_dir, out) == 1
    assert out.read_bytes() == reference and not Path(f"{out}.part").exists()


@pytest.mark.parametrize("case", ["foreign part", "resume without output"])
def test_resume_usage_errors_exit_2(case, tiny_bundle_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    Path(f"{out}.part").write_text('{"path": "a.png"}\nsomebody else\'s notes\n')
    argv = (["--output", str(out)] if case == "foreign part" else []) + ["--resume"]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", *argv, str(image_dir)])
    assert exit_info.value.code == 2
    assert ("line 2 is not a predict line" if case == "foreign part" else "give --output") in capsys.readouterr().err
    assert Path(f"{out}.part").read_text().endswith("notes\n") and not out.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="poll() on a pipe")
def test_predict_into_a_closed_pipe_ends_quietly_with_141(tiny_bundle_dir, image_dir, monkeypatch, capsys):
    """`emovlm-kd predict ... | head -1`, made deterministic: stdout is a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        code = main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", str(image_dir)])
        monkeypatch.undo()
    assert code == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_broken_pipe_elsewhere_is_not_hidden(tiny_bundle_dir, image_dir, monkeypatch):
    """Only stdout's reader going away ends quietly: a BrokenPipeError of another pipe or socket propagates."""
    import emovlm_kd.inference

    def broken(*args, **kwargs):
        raise BrokenPipeError("a socket of some library")

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", broken)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "r"), os.fdopen(write_end, "w") as healthy_pipe:
        monkeypatch.setattr(sys, "stdout", healthy_pipe)
        with pytest.raises(BrokenPipeError, match="a socket"):
            main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", str(image_dir)])


# ----------------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from emovlm_kd.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "FI", per_class=(1, 0, 1), image_size=40)


def evaluate(model, dataset, out):
    return main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--output-dir", str(out),
                 "--device", "cpu", "--batch-size", "8"])


def snapshot(folder):
    return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


def test_a_failure_while_writing_leaves_the_old_report_set_whole(tiny_bundle_dir, dataset_dir, tmp_path,
                                                                 monkeypatch):
    """predictions.jsonl of the new run is written, then a figure fails: the folder keeps every old file."""
    import emovlm_kd.evaluation.plots

    out = tmp_path / "report"
    assert evaluate(tiny_bundle_dir, dataset_dir, out) == 0
    before = snapshot(out)
    (out / "report.json").write_text('{"old": true}\n')  # an older run's report, to tell the sets apart
    before["report.json"] = b'{"old": true}\n'

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(emovlm_kd.evaluation.plots, "plot_complementarity", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate(tiny_bundle_dir, dataset_dir, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left beside it


def test_a_run_after_a_kill_replaces_the_set_and_clears_what_the_kill_left(tiny_bundle_dir, dataset_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}\n')
    (out / "confusion_matrix.png").write_bytes(b"old figure")
    dead = dead_pid()
    # what a killed writer leaves: `.NAME.emovlm-kd-PID-TOKEN.tmp` (emovlm_kd.folders.temp_path) of a process gone
    (out / f".predictions.jsonl.emovlm-kd-{dead}-0badc0de.tmp").write_text("half a line")
    staging = tmp_path / f".report.emovlm-kd-{dead}-12345678.tmp"  # a staging folder of a run killed while writing
    staging.mkdir()
    (staging / "predictions.jsonl").write_text("partial\n")
    (tmp_path / ".report.tmp").mkdir()  # a user's folder of a similar name: never ours to remove
    (tmp_path / ".report.tmp" / "notes.txt").write_text("mine\n")
    assert evaluate(tiny_bundle_dir, dataset_dir, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["complementarity.png", "confusion_matrix.png", "predictions.jsonl", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 8 and (out / "confusion_matrix.png").read_bytes() != b"old figure"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.tmp", "report"]
    assert (tmp_path / ".report.tmp" / "notes.txt").read_text() == "mine\n"


def dead_pid():
    """The pid of a process that has ended (a child run to completion and reaped): a killed writer's."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.parametrize("where", ["inside", "is the current folder"])
def test_evaluate_never_replaces_a_folder_holding_other_files(where, tiny_bundle_dir, dataset_dir, tmp_path, capsys,
                                                              monkeypatch):
    import emovlm_kd.inference

    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text('{"old": true}\n')
    if where == "is the current folder":
        (out / "notes.txt").unlink()
        monkeypatch.chdir(out)
    monkeypatch.setattr(emovlm_kd.inference, "run_batch", None)  # refused before any inference: never called
    with pytest.raises(SystemExit) as exit_info:
        evaluate(tiny_bundle_dir, dataset_dir, "." if where == "is the current folder" else out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and ("notes.txt" in err if where == "inside" else "current folder" in err)
    assert (out / "report.json").read_text() == '{"old": true}\n'
    if where == "inside":
        assert (out / "notes.txt").read_text() == "mine"


class FullDisk:
    """A file handle whose writes fail as on a full disk (ENOSPC), after `room` characters."""

    def __init__(self, handle, room=0):
        self.handle, self.room = handle, room

    def write(self, text):
        if len(text) > self.room:
            raise OSError(28, os.strerror(28))
        self.room -= len(text)
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.parametrize("where", ["the lines", "the record beside them"])
def test_a_full_disk_is_one_line_exit_1_and_nothing_a_rerun_trusts(where, tiny_bundle_dir, image_dir, tmp_path, capsys,
                                                                    monkeypatch):
    import builtins

    import emovlm_kd.commands.predict as predict_command

    out = tmp_path / "p.jsonl"
    if where == "the lines":  # the first batch's lines do not fit
        monkeypatch.setattr(predict_command, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)
        failed = f"{out}.part"
    else:  # the record of what the lines are for does not fit
        write_text = Path.write_text

        def full(self, *args, **kwargs):
            if self.name.endswith(".part.json"):
                raise OSError(28, os.strerror(28))
            return write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full)
        failed = f"{out}.part.json"
    code = predict(tiny_bundle_dir, image_dir, out)
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    lines = [line for line in err.splitlines() if "cannot write" in line]
    assert lines == [f"emovlm-kd: cannot write {failed}: No space left on device (errno 28, ENOSPC)"], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    if where == "the lines":  # kept for --resume, which drops a cut line: an empty part here
        assert Path(f"{out}.part").read_text() == ""
    else:  # nothing of the run left at all
        assert sorted(p.name for p in tmp_path.iterdir()) == []
