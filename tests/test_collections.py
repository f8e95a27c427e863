"""`predict` over collections (issue 25): the same images as files, a folder, parquet files, WebDataset shards, a
`save_to_disk` folder and a dataset opened by `load_dataset(NAME, streaming=True)` give the same predictions; the
data path (DataLoader workers, windows sorted by size) keeps the input order; JSONL or Parquet out; a kill and
`--resume` gives the uninterrupted output; two processes give the rows of one. Tiny bundle, CPU pinned, offline.

The fixtures are made as the formats are defined: parquet and `save_to_disk` by `datasets` itself (`Dataset.to_parquet`
embeds the image bytes in an `Image` column; `Dataset.save_to_disk`); WebDataset shards as the "webdataset" builder
reads them (datasets/packaged_modules/webdataset/webdataset.py: members `KEY.EXT` grouped by the key before the first
dot, one column per extension, `__key__`; https://huggingface.co/docs/datasets/image_dataset#webdataset). A Hub id
is exercised through the same `load_dataset(NAME, streaming=True)` call with NAME a local folder of parquet files
(datasets resolves it with its "parquet" builder, offline: HF_DATASETS_OFFLINE=1 in conftest), never the network.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from emovlm_kd.cli import main
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parents[1]
# sizes out of order, so that the windows sorted by size hold other batches than the input order would
SIZES = [(64, 40), (30, 30), (90, 50), (40, 70), (36, 36), (80, 80), (50, 30)]
NAMES = [f"img_{i}" for i in range(len(SIZES))]
BASE = ["--device", "cpu", "--batch-size", "2", "--num-workers", "0"]


def _png(i):
    buffer = io.BytesIO()
    random_image(*SIZES[i], seed=i).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The same 7 images (and one broken file, last) as a folder, two parquet files, a folder of parquet files
    (the `--dataset` case), a save_to_disk folder and two WebDataset shards."""
    from datasets import Dataset, Features, Image, Value

    root = tmp_path_factory.mktemp("collection")
    blobs = {name: _png(i) for i, name in enumerate(NAMES)}
    blobs["zz_broken"] = b"not an image"
    folder = root / "folder"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / f"{name}.png").write_bytes(blob)
    features = Features({"name": Value("string"), "picture": Image()})
    rows = {"name": list(blobs), "picture": [{"bytes": blob, "path": f"{name}.png"} for name, blob in blobs.items()]}
    dataset = Dataset.from_dict(rows, features=features)
    (root / "hub").mkdir()
    parquet = [root / "hub" / "part-0.parquet", root / "hub" / "part-1.parquet"]
    dataset.select(range(5)).to_parquet(str(parquet[0]))
    dataset.select(range(5, len(blobs))).to_parquet(str(parquet[1]))
    dataset.save_to_disk(str(root / "saved"))
    shards = [root / "shard-0.tar", root / "shard-1.tar"]
    for shard, names in zip(shards, (list(blobs)[:4], list(blobs)[4:])):
        with tarfile.open(shard, "w") as tar:
            for name in names:
                for member, data in ((f"{name}.png", blobs[name]), (f"{name}.json", json.dumps({"n": name}).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"folder": folder, "parquet": parquet, "saved": root / "saved", "hub": root / "hub", "shards": shards}


KINDS = {  # argv of each input kind, how its lines name an image (by name)
    "folder": (lambda c: [str(c["folder"])], "path"),
    "files": (lambda c: [str(p) for p in sorted(c["folder"].iterdir())], "path"),
    "parquet": (lambda c: [*map(str, c["parquet"]), "--id-column", "name"], "id"),
    "save_to_disk": (lambda c: [str(c["saved"]), "--image-column", "picture", "--id-column", "name"], "id"),
    "webdataset": (lambda c: list(map(str, c["shards"])), "id"),
    "dataset streamed": (lambda c: ["--dataset", str(c["hub"]), "--streaming", "--id-column", "name"], "id"),
}


def _name(record):
    return Path(record["path"]).stem if "path" in record else record["id"]


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _predict(model, argv, out, *extra):
    return main(["predict", "--model", str(model), *BASE, "--output", str(out), *argv, *extra])


@pytest.fixture(scope="module")
def reference(tiny_bundle_dir, collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "folder.jsonl"
    assert _predict(tiny_bundle_dir, KINDS["folder"][0](collection), out) == 1  # the broken file: skipped
    return out


def _without_key(record):
    return {k: v for k, v in record.items() if k not in ("path", "id")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_input_kind_predicts_what_the_files_give(kind, tiny_bundle_dir, collection, reference, tmp_path):
    argv, key = KINDS[kind]
    out = tmp_path / "out.jsonl"
    assert _predict(tiny_bundle_dir, argv(collection), out) == 1
    got, want = _lines(out), _lines(reference)
    assert [_name(r) for r in got] == [*NAMES, "zz_broken"]  # input order, whatever the size grouping did
    assert all(key in r for r in got)
    assert [_without_key(r) for r in got] == [_without_key(r) for r in want]  # the same batches: the same floats
    assert "error" in got[-1] and "error" not in got[0]


def test_the_windows_are_sorted_by_size_and_written_in_input_order(collection):
    from emovlm_kd.collection import open_inputs
    from emovlm_kd.datapath import plan_batches

    rows = open_inputs([str(collection["folder"])]).rows()
    planned = list(plan_batches(rows, batch_size=2, group=2))
    first_window = [row.position for batch in planned if batch.window == 0 for row in batch.rows]
    sizes = [SIZES[i][0] * SIZES[i][1] for i in range(4)]
    assert first_window == sorted(range(4), key=sizes.__getitem__)  # [1, 0, 3, 2]: smallest first
    assert [len(b.rows) for b in planned] == [2, 2, 2, 2] and planned[-1].window == 1
    assert planned[-1].rows[-1].id.endswith("zz_broken.png")  # no readable header: last of its window


def test_workers_give_the_same_lines_as_the_main_process(tiny_bundle_dir, collection, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", "--batch-size", "2", "--num-workers", "2",
            "--output", str(out), *map(str, collection["parquet"]), "--id-column", "name"]
    assert main(argv) == 1
    assert [_without_key(r) for r in _lines(out)] == [_without_key(r) for r in _lines(reference)]


def test_parquet_output_holds_the_json_lines(tiny_bundle_dir, collection, tmp_path):
    import pyarrow.parquet as pq

    out, lines = tmp_path / "out.parquet", tmp_path / "out.jsonl"
    argv = [*KINDS["parquet"][0](collection), "--group-batches", "2"]  # windows of 4 rows
    assert _predict(tiny_bundle_dir, argv, out, "--row-group-size", "3") == 1
    assert _predict(tiny_bundle_dir, argv, lines) == 1  # the same batches as JSON lines
    file = pq.ParquetFile(out)
    assert file.metadata.num_row_groups == 2  # a group as soon as 3 rows are held: 4 + 4
    rows = file.read().to_pylist()
    want = _lines(lines)
    assert [r["id"] for r in rows] == [*NAMES, "zz_broken"]
    for row, line in zip(rows, want):
        for field in ("label", "score", "scores", "distill", "error"):
            assert row[field] == line.get(field), field
        if "vlm" in line:
            assert row["vlm"] == {**line["vlm"], "answer": None}
    assert not Path(f"{out}.part").exists() and not Path(f"{out}.part.json").exists()


KILLED_AT_BATCH = """
import os, signal, sys
import emovlm_kd.inference as inference
from emovlm_kd.cli import main

real, calls, at = inference.run_batch, [], int(os.environ["KILL_AT_BATCH"])

def run_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup code of ours runs
    return real(*args, **kwargs)

inference.run_batch = run_batch
sys.exit(main(sys.argv[1:]))
"""

RESUMED = {  # input kind, output suffix, extra flags: killed at model call 4 (of 4), two windows of 2 batches done
    "folder": ("folder", ".jsonl", []),
    "parquet input": ("parquet", ".jsonl", []),
    "streamed dataset, parquet output": ("dataset streamed", ".parquet", ["--row-group-size", "1"]),
}


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("case", list(RESUMED))
def test_a_kill_and_resume_give_the_uninterrupted_output(case, tiny_bundle_dir, collection, tmp_path):
    """Windows of 2 batches of 2 (`--group-batches 2`), sorted by size: [1, 0] [3, 2] | [4, 6] [5, broken].
    SIGKILL at the 4th model call: rows 0-4 were written (each as soon as the rows before it were); `--resume` goes
    on from position 5, computing the window that holds it again (the same batches), writing only rows 5-7."""
    kind, suffix, extra = RESUMED[case]
    argv = [*KINDS[kind][0](collection), "--group-batches", "2", *extra]
    whole, out = tmp_path / f"whole{suffix}", tmp_path / f"out{suffix}"
    assert _predict(tiny_bundle_dir, argv, whole) == 1
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "KILL_AT_BATCH": "4", "PYTHONPATH": path}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_BATCH, "predict", "--model", str(tiny_bundle_dir), *BASE,
                             "--output", str(out), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=False, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not out.exists() and Path(f"{out}.part.json").is_file()
    part = Path(f"{out}.part")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        assert sum(pq.ParquetFile(group).metadata.num_rows for group in part.glob("rows-*.parquet")) == 5
    else:
        assert len(part.read_text().splitlines()) == 5
    assert _predict(tiny_bundle_dir, argv, out, "--resume") == 1
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).to_pylist() == pq.read_table(whole).to_pylist()
    else:
        assert out.read_bytes() == whole.read_bytes()


KILLED_IN_A_PARQUET_WRITE = """
import json, os, signal, sys
import pyarrow.parquet as pq
from emovlm_kd.parquetout import ParquetParts

out, where = sys.argv[1], sys.argv[2]
parts = ParquetParts(out, "path", {0: "negative", 1: "positive"}, record=json.loads(sys.argv[3]), row_group_size=1)
parts.write([{"path": "img_0", "label": "positive", "score": 0.75}])  # group 0: complete, in place
if where == "a row group":
    real = pq.write_table

    def write_table(*args, **kwargs):  # group 1 written whole to its temp name, then the kill before the rename
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    pq.write_table = write_table
    parts.write([{"path": "img_1", "label": "negative", "score": 0.5}])
else:
    parts.write([{"path": "img_1", "label": "negative", "score": 0.5}])
    real = pq.ParquetWriter.write_table

    def write_table(self, *args, **kwargs):  # FILE's first group copied into its temp name, no footer yet: killed
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    pq.ParquetWriter.write_table = write_table
    parts.finish()
"""


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("where", ["a row group", "the final file"])
def test_a_parquet_write_cut_by_a_kill_leaves_a_temp_file_the_next_run_removes(where, tmp_path):
    """The Parquet writer's files go through `folders.staged_file`: a kill mid-write leaves a temp file of the one
    pattern (`.NAME.emovlm-kd-PID-TOKEN.tmp`, a group's in FILE.part/, FILE's beside it) that `--resume` (and a fresh
    run) removes once its process is gone; the complete groups are kept, and nothing of the user's is touched."""
    import pyarrow.parquet as pq

    from emovlm_kd.folders import PARTIAL_WRITE, is_leftover
    from emovlm_kd.parquetout import ParquetParts

    out, part = tmp_path / "out.parquet", tmp_path / "out.parquet.part"
    record = {"inputs": {"count": 3}, "model": "m", "settings": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_A_PARQUET_WRITE, str(out), where, json.dumps(record)],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert killed.returncode == -9, killed.stderr[-3000:]
    folder, cut = (part, "rows-000001.parquet") if where == "a row group" else (tmp_path, out.name)
    leftovers = [p for p in folder.iterdir() if PARTIAL_WRITE.match(p.name)]
    assert [PARTIAL_WRITE.match(p.name)["name"] for p in leftovers] == [cut] and is_leftover(leftovers[0].name)
    assert sorted(p.name for p in part.glob("rows-*.parquet")) == (
        ["rows-000000.parquet"] if where == "a row group" else ["rows-000000.parquet", "rows-000001.parquet"])
    assert not out.exists()
    users = {tmp_path / "out.parquet.tmp": "mine\n",  # a user's names, and a live writer's temp file: kept
             tmp_path / f".out.parquet.emovlm-kd-{os.getpid()}-0123abcd.tmp": "a live writer's\n"}
    for path, text in users.items():
        path.write_text(text)

    parts = ParquetParts(out, "path", {0: "negative", 1: "positive"}, resume=True, record=record, row_group_size=1)
    assert not any(p.exists() for p in leftovers)
    kept = ["img_0"] if where == "a row group" else ["img_0", "img_1"]
    assert parts.kept_ids == kept
    rows = [{"path": f"img_{i}", "label": "positive", "score": 0.25} for i in range(len(kept), 3)]
    parts.write(rows)
    parts.finish()
    assert pq.read_table(out).column("id").to_pylist() == ["img_0", "img_1", "img_2"]
    assert {path: path.read_text() for path in users} == users
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in users)])


def test_resume_refuses_rows_that_are_not_the_first_inputs(tiny_bundle_dir, collection, tmp_path, capsys,
                                                           monkeypatch):
    import emovlm_kd.inference

    out = tmp_path / "out.jsonl"
    argv = KINDS["parquet"][0](collection)
    real = emovlm_kd.inference.run_batch

    def stop_at_second(*args, **kwargs):
        stop_at_second.calls += 1
        if stop_at_second.calls == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stop_at_second.calls = 0
    monkeypatch.setattr(emovlm_kd.inference, "run_batch", stop_at_second)
    assert _predict(tiny_bundle_dir, argv, out, "--group-batches", "1") == 130
    part = Path(f"{out}.part")
    lines = part.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    part.write_text(lines[1] + lines[0])  # the right rows, in another order
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _predict(tiny_bundle_dir, argv, out, "--group-batches", "1", "--resume")
    assert exit_info.value.code == 2
    assert "row 1 names 'img_1' where input 1 is 'img_0'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["mixed kinds", "no such column", "no split", "dataset and files"])
def test_dataset_usage_errors_are_one_line_before_the_model_loads(case, tiny_bundle_dir, collection, capsys,
                                                                  monkeypatch):
    import emovlm_kd.hub

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(emovlm_kd.hub, "load_model", never)
    argv, says = {
        "mixed kinds": ([str(collection["parquet"][0]), str(collection["shards"][0])], "the inputs mix"),
        "no such column": ([str(collection["parquet"][0]), "--id-column", "nope"],
                           "--id-column 'nope' is not a column"),
        "no split": (["--dataset", str(collection["hub"]), "--split", "test"],
                     f'cannot read {collection["hub"]} as a dataset: ValueError: Unknown split "test"'),
        "dataset and files": ([str(collection["folder"]), "--dataset", str(collection["hub"])], "not both"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("kind", ["dataset streamed", "save_to_disk"])
def test_two_processes_give_the_rows_of_one(kind, tiny_bundle_dir, collection, tmp_path):
    """`torchrun --nproc_per_node 2` on the CPU (gloo): each process reads one row in two (a streamed dataset
    through `split_dataset_by_node(strategy="examples")`, a map-style one by `select`), the main process writes
    one file in input order; the rows equal one process's (scores within 1e-5: other batches)."""
    from tests.test_sharded_inference import _assert_close, _torchrun

    argv = [*KINDS[kind][0](collection), "--device", "cpu", "--batch-size", "2", "--group-batches", "2"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["predict", "--model", str(tiny_bundle_dir), "--num-workers", "0", "--output", str(one), *argv]) == 1
    result = _torchrun("predict", "--model", str(tiny_bundle_dir), "--output", str(two), *argv)
    assert result.returncode == 1, result.stderr[-3000:]  # the broken row: skipped
    assert [r["id"] for r in _lines(two)] == [*NAMES, "zz_broken"]
    _assert_close(_lines(two), _lines(one))
    assert "process 1 of 2 predicted 4 input(s)" in result.stderr  # rows 0, 2, 4, 6
    assert "process 2 of 2 predicted 4 input(s)" in result.stderr  # rows 1, 3, 5, 7
    assert result.stderr.count("predicted 7, skipped 1") == 1


class Terminal:
    """stderr as a terminal (tqdm shows its bar only where `isatty()`), the text kept."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_a_progress_bar_on_a_terminal_only_and_a_throughput_line(quiet, tiny_bundle_dir, collection, tmp_path,
                                                                 monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["--quiet"] if quiet else []
    assert _predict(tiny_bundle_dir, [str(collection["folder"])], tmp_path / "out.jsonl", *argv) == 1
    bar = [line for line in terminal.text.replace("\r", "\n").splitlines() if line.startswith("predict:")]
    if quiet:
        assert bar == []
    else:
        assert bar and "8/8" in bar[-1] and "img/s" in bar[-1], terminal.text[-2000:]
    final = [line for line in terminal.text.splitlines() if line.startswith("predicted 7, skipped 1 in ")]
    assert len(final) == 1 and final[0].endswith(" images/s)"), terminal.text[-2000:]
    monkeypatch.undo()
    assert _predict(tiny_bundle_dir, [str(collection["folder"])], tmp_path / "again.jsonl") == 1
    assert "predict:" not in capsys.readouterr().err  # not a terminal: no bar
