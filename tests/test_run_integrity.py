"""Run integrity (issue 12): stage and cache keys that see the image files, an export verified by the sha256 of the
files it wrote, one writer per run folder (RUN/.lock), files written with the umask's mode.

One tiny run is trained once for the module; each destructive case works on a copy of it (`shutil.copytree`, which
keeps modification times) and changes the module's dataset copy in place only inside `changed_images`, which puts
every file back with its bytes and modification time. The damaged-export case damages the run itself, which its
rerun must restore byte for byte.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_settings
from PIL import Image

from emovlm_kd.folders import default_file_mode
from emovlm_kd.training.cache import fingerprint_dataset, image_stamp
from emovlm_kd.training.runlock import LOCK_FILE, RunFolderBusy, hold_run_lock

REPO = Path(__file__).resolve().parents[1]
LIGHT = {"sft_epochs": 1.0, "teacher_epochs": 1.0, "distill_epochs": 3.0, "gate_epochs": 3.0}  # a shorter tiny run
STAGES = ["stage0_instructions", "stage1_sft", "stage2_teacher", "stage3_distill", "stage4_gate"]


@pytest.fixture(scope="module")
def integrity_run(tiny_inputs, tmp_path_factory):
    """(settings(out, **extra) -> TrainConfig over the module's dataset copy, the run folder, its results)."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.training.runner import run_training

    _, vlm, teacher = tiny_inputs
    root = tmp_path_factory.mktemp("integrity")
    make_synthetic_dataset(root / "data", per_class=(2, 1, 1))  # changed in place by some tests (and put back)

    def settings(out, **extra):
        return tiny_settings(root / "data", vlm, teacher, out, **{**LIGHT, **extra})

    out = root / "run"
    results = run_training(settings(out))
    return settings, out, results


def copy_run(out, tmp_path):
    return Path(shutil.copytree(out, tmp_path / "run"))


@contextmanager
def changed_images(paths, backup):
    """Each of `paths` replaced by a black image of its size for the block; afterwards bytes and mtime restored."""
    backup.mkdir(parents=True, exist_ok=True)
    saved = [Path(shutil.copy2(path, backup / f"{i}{path.suffix}")) for i, path in enumerate(paths)]
    try:
        for path in paths:
            with Image.open(path) as image:
                size, mode = image.size, image.mode
            Image.new(mode, size).save(path)
        yield
    finally:
        for path, copy in zip(paths, saved):
            shutil.copy2(copy, path)


def cache_files(run):
    """{cache name (e.g. vlm_pass-test): file name (with its key)}."""
    return {path.name.rsplit("-", 1)[0]: path.name for path in (run / "cache").glob("*.safetensors")}


def done_keys(run):
    return {stage: json.loads((run / stage / "DONE.json").read_text())["key"] for stage in STAGES}


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Keys that see the image files
# ---------------------------------------------------------------------------------------------------------------


def test_changed_test_images_recompute_the_test_caches_and_the_results(integrity_run, tmp_path, caplog):
    from safetensors.torch import load_file

    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.training.runner import run_training

    settings, out, _ = integrity_run
    run, before, keys = copy_run(out, tmp_path), cache_files(out), done_keys(out)
    test_images = sorted((Path(settings(run).dataset) / "test").rglob("*.png"))
    with changed_images(test_images, tmp_path / "backup"), caplog.at_level("INFO"):
        results = run_training(settings(run))
    after = cache_files(run)
    for name in ("vlm_pass-test", "teacher-test"):
        assert after[name] != before[name], name  # recomputed under a new key
    for name in ("vlm_pass-train", "vlm_pass-val", "teacher-train", "teacher-val"):
        assert after[name] == before[name], name  # untouched images: cache hit
    assert sum("cache hit" in record.getMessage() for record in caplog.records) == 4
    assert done_keys(run) == keys  # no stage trains on test images
    old, new = load_file(out / "cache" / before["vlm_pass-test"]), load_file(run / "cache" / after["vlm_pass-test"])
    assert not torch.equal(old["image_embeds"], new["image_embeds"])
    labels = torch.tensor(load_image_dataset(settings(run).dataset)["test"]["label"])
    vlm_accuracy = round(float((new["vlm_log_likelihoods"].argmax(-1) == labels).float().mean()), 4)
    teacher = load_file(run / "cache" / after["teacher-test"])["teacher_logits"]
    teacher_accuracy = round(float((teacher.argmax(-1) == labels).float().mean()), 4)
    saved = json.loads((run / "eval_results.json").read_text())
    assert saved == results
    assert (saved["accuracy"]["vlm"], saved["accuracy"]["teacher"]) == (vlm_accuracy, teacher_accuracy)


def test_a_changed_train_image_retrains_the_stages_that_read_it(integrity_run, tmp_path):
    from emovlm_kd.training.runner import run_training

    settings, out, _ = integrity_run
    run, before, keys = copy_run(out, tmp_path), cache_files(out), done_keys(out)
    one_train_image = sorted((Path(settings(run).dataset) / "train").rglob("*.png"))[:1]
    with changed_images(one_train_image, tmp_path / "backup"):
        run_training(settings(run))
    after, new_keys = cache_files(run), done_keys(run)
    for stage in ("stage0_instructions", "stage1_sft", "stage2_teacher", "stage3_distill", "stage4_gate"):
        assert new_keys[stage] != keys[stage], stage
    for name in ("vlm_pass-train", "teacher-train", "teacher-test"):  # the changed image; the retrained teacher
        assert after[name] != before[name], name


def bmp_imagefolder(root):
    """`root/{train,val,test}/{a,b}/{0,1}.bmp`: uncompressed, so a changed pixel keeps the file's size."""
    for split in ("train", "val", "test"):
        for label_index, label in enumerate("ab"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (80 * label_index, 40 * i, 100)).save(folder / f"{i}.bmp")
    return root


@pytest.mark.parametrize("verify", ["stat", "content"])
def test_verify_data_content_sees_a_change_that_keeps_size_and_mtime(tmp_path, verify):
    from emovlm_kd.training.config import TrainConfig
    from emovlm_kd.training.runner import load_data

    root = bmp_imagefolder(tmp_path / "data")
    cfg = TrainConfig(dataset=str(root), instruction_kinds=["categorical"], verify_data=verify)
    before = {name: fingerprint_dataset(split) for name, split in load_data(cfg, root).items()}
    assert before == {name: fingerprint_dataset(split) for name, split in load_data(cfg, root).items()}
    target = root / "test" / "a" / "0.bmp"
    info = target.stat()
    with Image.open(target) as image:
        image = image.copy()
    image.putpixel((3, 3), (255, 255, 255))
    image.save(target)
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    after = {name: fingerprint_dataset(split) for name, split in load_data(cfg, root).items()}
    assert after["train"] == before["train"] and after["val"] == before["val"]
    if verify == "content":
        assert after["test"] != before["test"]
    else:  # what stat cannot see, by construction: why `content` exists
        assert after["test"] == before["test"]
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
        assert fingerprint_dataset(load_data(cfg, root)["test"]) != before["test"]


def test_image_stamps_cover_files_held_bytes_and_missing_files(tmp_path):
    file = tmp_path / "a.png"
    file.write_bytes(b"12345")
    info = file.stat()
    assert image_stamp(str(file), None, "stat") == f"5:{info.st_mtime_ns}"
    assert image_stamp(str(file), None, "content") == "5:" + hashlib.sha256(b"12345").hexdigest()
    held = image_stamp("name-only.png", b"abc", "stat")
    assert held == image_stamp(str(file), b"abc", "content") == "bytes:" + hashlib.sha256(b"abc").hexdigest()
    assert image_stamp(str(tmp_path / "gone.png"), None, "stat") == f"missing:{tmp_path / 'gone.png'}"
    assert image_stamp(None, None, "content") == "missing:None"


def test_a_dataset_holding_its_image_bytes_is_fingerprinted_by_them(tmp_path):
    """A `save_to_disk` dataset (as a Hub dataset) with an `Image` column: the cells hold bytes, no file."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.training.cache import files_fingerprint

    def saved(folder, shade):
        images = [Image.new("RGB", (16, 16), (shade if i == 0 else 10 * i, 0, 0)) for i in range(4)]
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
        Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features).save_to_disk(folder)
        return load_image_dataset(str(folder), val_fraction=0.0)["train"]

    first, same, other = saved(tmp_path / "one", 200), saved(tmp_path / "two", 200), saved(tmp_path / "three", 201)
    cells = first.cast_column("image", ImageFeature(decode=False))["image"]
    assert all(cell["bytes"] for cell in cells)  # the bytes branch is the one exercised
    for verify in ("stat", "content"):
        assert files_fingerprint(first, verify) == files_fingerprint(same, verify)
        assert files_fingerprint(first, verify) != files_fingerprint(other, verify)


# ---------------------------------------------------------------------------------------------------------------
# The export, verified by the sha256 of what it wrote
# ---------------------------------------------------------------------------------------------------------------


def test_the_export_records_every_file_it_wrote(integrity_run):
    _, out, _ = integrity_run
    recorded = json.loads((out / "stage5_export" / "files.json").read_text())
    model_files = sorted(p.relative_to(out).as_posix() for p in (out / "model").rglob("*") if p.is_file())
    assert sorted(recorded) == sorted([*model_files, "eval_results.json"])
    assert "model/model.safetensors" in recorded and LOCK_FILE not in {Path(name).name for name in recorded}
    assert all(recorded[name] == sha256(out / name) for name in recorded)


def test_a_missing_or_altered_file_of_the_export_is_named(integrity_run, tmp_path):
    from emovlm_kd.training.runner import export_damage

    _, out, _ = integrity_run
    run = copy_run(out, tmp_path)
    stage = run / "stage5_export"
    assert export_damage(run, stage) is None
    for name in json.loads((stage / "files.json").read_text()):
        original = (run / name).read_bytes()
        (run / name).unlink()
        assert export_damage(run, stage) == f"{run / name} is missing"
        (run / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
        assert export_damage(run, stage) == f"{run / name} differs from the file the export wrote (sha256)"
        (run / name).write_bytes(original)
    assert export_damage(run, stage) is None
    (stage / "files.json").write_text("[]")  # a record that is not one (or none: an export of an older version)
    assert export_damage(run, stage) == f"{stage / 'files.json'}, the record of the exported files, is missing or " \
                                        "unreadable"


def test_a_damaged_export_is_rebuilt_identical_on_rerun(integrity_run, caplog):
    """In the module's run folder itself (a copy's config would name the copy's path): rebuilt, it is as before."""
    from emovlm_kd.training.runner import run_training

    settings, run, results = integrity_run
    recorded = json.loads((run / "stage5_export" / "files.json").read_text())
    marks = {stage: (run / stage / "DONE.json").read_text() for stage in STAGES}
    os.truncate(run / "model" / "model.safetensors", 1000)
    (run / "model" / "tokenizer.json").unlink()
    (run / "eval_results.json").write_text("{}")
    with caplog.at_level("INFO"):
        assert run_training(settings(run)) == results
    rebuilt = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "[export]" in r.getMessage()]
    expected = (f"[export] {run / 'model' / 'model.safetensors'} differs from the file the export wrote (sha256): "
                "rebuilding RUN/model and eval_results.json")
    assert rebuilt == [expected]
    assert {name: sha256(run / name) for name in recorded} == recorded  # byte for byte what the first export wrote
    assert json.loads((run / "stage5_export" / "files.json").read_text()) == recorded
    assert {stage: (run / stage / "DONE.json").read_text() for stage in STAGES} == marks


# ---------------------------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------------------------

HOLDER = """
import os, sys
from emovlm_kd.training.runlock import hold_run_lock
with hold_run_lock(sys.argv[1]):
    print(os.getpid(), flush=True)
    sys.stdin.read()  # held until the test closes stdin or kills this process
"""


def child_env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


@contextmanager
def lock_held_by_another_process(run_dir):
    """A child process holding `run_dir`'s lock for the block (SIGKILL-ed after it); yields its pid."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=child_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), child.stderr.read()[-2000:]
        yield int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)


def test_a_second_run_on_a_locked_folder_is_refused_at_once_and_writes_nothing(tiny_inputs, tmp_path):
    from emovlm_kd.errors import UsageError
    from emovlm_kd.training.runner import run_training

    run = tmp_path / "run"
    with lock_held_by_another_process(run) as pid:
        started = time.perf_counter()
        with pytest.raises(RunFolderBusy) as refused:
            run_training(tiny_settings(*tiny_inputs, run))
        assert time.perf_counter() - started < 5.0
    message = str(refused.value)
    assert isinstance(refused.value, UsageError) and "\n" not in message
    assert message.startswith(f"{run} is in use by another training run (pid {pid} on ")
    assert message.endswith("wait for it to end, or choose another --output-dir")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing else written
    with hold_run_lock(run):  # the holder was SIGKILL-ed: the OS released its lock
        assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


def test_the_cli_exits_2_with_the_message_when_the_folder_is_locked(tiny_inputs, tmp_path, capsys):
    import yaml

    from emovlm_kd.cli import main

    cfg = tiny_settings(*tiny_inputs, tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    with lock_held_by_another_process(cfg.output_dir) as pid, pytest.raises(SystemExit) as exited:
        main(["train", "--config", str(config)])
    assert exited.value.code == 2
    assert f"error: {cfg.output_dir} is in use by another training run (pid {pid} on " in capsys.readouterr().err


def lock_is_free(run_dir):
    """Whether a new open file description gets the lock (flock: even in the process that holds it, it would not)."""
    import fcntl

    with open(run_dir / LOCK_FILE, "a+") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        return True


def test_a_process_holding_the_lock_takes_it_again_and_the_outer_hold_releases_it(tmp_path):
    run = tmp_path / "run"
    with hold_run_lock(run):
        with hold_run_lock(run):  # e.g. the command line took it, then run_training takes it
            assert not lock_is_free(run)
        assert not lock_is_free(run)  # the inner block did not release it
    assert lock_is_free(run)


# Each line is one write(2) of its own (os.write, under PIPE_BUF): `print` writes the text and the newline in two
# calls, and the two processes' lines then interleaved on the shared pipe ("rank 0 refused: ...rank 1 refused: ...\n\n",
# one line lost; seen once in CI).
TORCHRUN_SCRIPT = """
import os, sys
from emovlm_kd.distributed import state
from emovlm_kd.training.runlock import RunFolderBusy, hold_run_lock
rank = state().process_index

def say(line):
    os.write(1, (line + "\\n").encode())

with hold_run_lock(sys.argv[1]):  # a free folder: every process of the launch goes on
    say(f"rank {rank} pid {os.getpid()} holds")
    state().wait_for_everyone()
try:
    with hold_run_lock(sys.argv[2]):  # a folder another run holds: every process is refused
        say(f"rank {rank} let in")
except RunFolderBusy as error:
    say(f"rank {rank} refused: {error}")
"""


@pytest.mark.timeout(300)
def test_the_processes_of_one_torchrun_launch_share_the_lock_and_another_run_refuses_them(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    script, free, busy = tmp_path / "lock_script.py", tmp_path / "free", tmp_path / "busy"
    script.write_text(TORCHRUN_SCRIPT)
    launch = ["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(free), str(busy)]
    with hold_run_lock(busy):
        result = subprocess.run(launch, env={**child_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                check=False, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    held, refused = [line for line in lines if line.endswith("holds")], [line for line in lines if "refused" in line]
    assert [line.split()[1] for line in held] == ["0", "1"]
    assert (free / LOCK_FILE).read_text().startswith(f"pid {held[0].split()[3]} on ")  # the main process took it
    assert [line.split()[1] for line in refused] == ["0", "1"] and len(lines) == 4, result.stdout
    assert all(f"refused: {busy} is in use by another training run (pid {os.getpid()} on " in line for line in refused)


# ---------------------------------------------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------------------------------------------


def test_every_file_of_the_run_has_the_umask_mode(integrity_run):
    _, out, _ = integrity_run
    mode = default_file_mode()
    files = [p for folder in ["model", "cache", *STAGES, "stage5_export"] for p in (out / folder).rglob("*")
             if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != mode} == {}


def test_a_saved_bundle_has_the_umask_mode(tiny_bundle_dir):
    mode = default_file_mode()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in Path(tiny_bundle_dir).iterdir()
            if p.stat().st_mode & 0o777 != mode} == {}


def test_a_cache_file_has_the_umask_mode_as_soon_as_it_is_written(tmp_path):
    from emovlm_kd.training.cache import TensorCache

    path = TensorCache(tmp_path / "cache").put("pass", "k1", {"x": torch.zeros(2)})
    assert path.stat().st_mode & 0o777 == default_file_mode()


def test_temp_files_of_killed_writes_are_removed_at_the_start_and_nothing_else(tmp_path):
    """Our temp names (`.NAME.emovlm-kd-PID-TOKEN.tmp`, `.old`: files, and folders such as a killed export's) of a
    process that is gone; never a live writer's, never a name of the user's (`NAME.tmp`, `.NAME.PID.tmp`)."""
    from emovlm_kd.training.runner import remove_partial_writes

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    gone, alive = child.pid, os.getppid()
    left = [tmp_path / "cache" / f".vlm_pass-train-abc.safetensors.emovlm-kd-{gone}-0123abcd.tmp",
            tmp_path / f".train_config.json.emovlm-kd-{gone}-4567cdef.tmp",
            tmp_path / f".model.emovlm-kd-{gone}-89abcdef.tmp" / "model.safetensors",
            tmp_path / f".model.emovlm-kd-{gone}-01234567.old" / "examples" / "a.png",
            tmp_path / "stage1_sft" / f".merged.emovlm-kd-{gone}-fedcba98.tmp" / "config.json"]
    kept = [tmp_path / "data" / "synthetic.json.tmp", tmp_path / "notes.tmp", tmp_path / "cache" / ".keep.tmp",
            tmp_path / ".train_config.json.7.tmp", tmp_path / "model.tmp" / "thesis.txt",
            tmp_path / ".model.old" / "notes.txt", tmp_path / f".eval.emovlm-kd-{alive}-0123abcd.tmp" / "report.json",
            tmp_path / f".model.emovlm-kd-{gone}-xyz.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    remove_partial_writes(tmp_path)
    assert [p.exists() for p in left] == [False] * len(left) and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if "emovlm-kd" in p.name) == [
        f".eval.emovlm-kd-{alive}-0123abcd.tmp", f".model.emovlm-kd-{gone}-xyz.tmp"]  # the folders went too
