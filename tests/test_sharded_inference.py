"""`predict` and `evaluate` under `torchrun --nproc_per_node 2` on the CPU (gloo, `CUDA_VISIBLE_DEVICES=""`): the
inputs are sharded between the processes and the main process alone writes one JSONL (and one report), in input
order, equal to one process's output line for line (scores within 1e-5)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from emovlm_kd.cli import main

NUM_IMAGES = 7  # odd: the processes' shares differ in size and the last round is partial
BATCH = "2"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*cli_args):
    """`torchrun --nproc_per_node 2 -m emovlm_kd.cli ...` on the CPU; the finished process."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "emovlm_kd.cli", *cli_args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from tests.conftest import random_image

    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        random_image(40 + 9 * i, 70 - 4 * i, seed=i).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture(scope="module")
def one_process_lines(tiny_bundle_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "predictions.jsonl"
    assert main(["predict", "--model", str(tiny_bundle_dir), str(image_dir), "--output", str(out),
                 "--batch-size", BATCH, "--device", "cpu"]) == 0
    return _records(out)


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_same_predictions(records, expected):
    """Same inputs in the same order, same labels, every score within 1e-5."""
    assert [r["path"] for r in records] == [r["path"] for r in expected]
    for got, want in zip(records, expected):
        assert got["label"] == want["label"] and got["distill"]["label"] == want["distill"]["label"]
        assert got["vlm"]["label"] == want["vlm"]["label"]
        for part in (lambda r: r["scores"], lambda r: r["vlm"]["scores"], lambda r: r["distill"]["scores"]):
            assert part(got).keys() == part(want).keys()
            assert max(abs(part(got)[k] - part(want)[k]) for k in part(want)) <= 1e-5


def _assert_close(got, want, where="line"):
    """Equal JSON values, floats within 1e-5."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, (int, float)) and abs(got - want) <= 1e-5, where
    else:
        assert got == want, where


def test_one_process_shards_are_the_batches_in_order():
    from emovlm_kd.inference import gather_in_order, sharded_batches

    rounds = list(sharded_batches(range(7), 3))
    assert rounds == [[0, 1, 2], [3, 4, 5], [6]]
    assert gather_in_order(rounds[1]) == [3, 4, 5]


def test_two_processes_predict_the_same_lines_in_the_same_order(tiny_bundle_dir, image_dir, one_process_lines,
                                                                 tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = _torchrun("predict", "--model", str(tiny_bundle_dir), str(image_dir), "--output", str(out),
                       "--batch-size", BATCH, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "predictions.jsonl.part").exists()
    assert len(one_process_lines) == NUM_IMAGES
    _assert_same_predictions(_records(out), one_process_lines)
    assert result.stderr.count("predicted 7, skipped 0") == 1  # the main process reports, once
    # one input in two each (emovlm_kd.collection): process 1 takes 0, 2, 4 and 6, process 2 takes 1, 3 and 5
    assert "process 1 of 2 predicted 4 input(s)" in result.stderr
    assert "process 2 of 2 predicted 3 input(s)" in result.stderr


def test_two_processes_resume_a_part_file(tiny_bundle_dir, image_dir, one_process_lines, tmp_path, monkeypatch):
    """A `.part` holding the first 3 lines (one process, stopped by Ctrl-C) and a 4th cut short: the two processes
    predict only the other 4."""
    import emovlm_kd.inference

    out = tmp_path / "predictions.jsonl"
    real = emovlm_kd.inference.run_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(emovlm_kd.inference, "run_batch", interrupted)
    assert main(["predict", "--model", str(tiny_bundle_dir), str(image_dir), "--output", str(out), "--batch-size",
                 "3", "--group-batches", "1", "--device", "cpu"]) == 130  # FILE.part (3 lines) and FILE.part.json (what they were for)
    kept = (tmp_path / "predictions.jsonl.part").read_text(encoding="utf-8")
    assert len(kept.splitlines()) == 3
    with open(tmp_path / "predictions.jsonl.part", "a", encoding="utf-8") as handle:
        handle.write('{"path": "cut')
    result = _torchrun("predict", "--model", str(tiny_bundle_dir), str(image_dir), "--output", str(out),
                       "--batch-size", BATCH, "--device", "cpu", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_predictions(_records(out), one_process_lines)
    assert out.read_text(encoding="utf-8").startswith(kept)  # the kept lines, byte for byte


def test_two_processes_evaluate_to_the_same_report(tiny_bundle_dir, tmp_path):
    from emovlm_kd.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "FI", per_class=(1, 0, 1), image_size=40)  # 8 test images
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", str(tiny_bundle_dir), "--dataset", str(data), "--batch-size", "3", "--device", "cpu"]
    assert main(["evaluate", *common, "--output-dir", str(one), "--num-workers", "0"]) == 0
    result = _torchrun("evaluate", *common, "--output-dir", str(two), "--num-workers", "1")  # a loader per process
    assert result.returncode == 0, result.stderr[-3000:]
    lines_one = _records(one / "predictions.jsonl")
    lines_two = _records(two / "predictions.jsonl")
    assert len(lines_one) == 8
    assert [r["id"] for r in lines_two] == [r["id"] for r in lines_one]
    for got, want in zip(lines_two, lines_one):
        _assert_close(got, want)
    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert report_two["accuracy"] == report_one["accuracy"]
    assert report_two["num_samples"] == report_one["num_samples"] == 8
    assert result.stdout.count("report:") == 1  # printed by the main process only
