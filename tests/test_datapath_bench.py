"""`python -m benchmarks.datapath`: its CPU report (`--config tiny`) and its model report (`--config 7b` on a GPU,
`--config small` or few layers on the CPU) run and say what they measured. No timing is asserted (machines are
noisy): the reports must hold their figures, and the ratios must be computed from them."""

import json

import pytest
import torch

from benchmarks import datapath

TINY_KEYS = {"images", "size", "batch_size", "threads", "device", "config", "modules", "loader", "decode_prepare_ms",
             "processor_ms", "data_path_ms", "model_only_images_per_s", "load_average"}
FIGURES = {"image_tokens", "memory", "model_only_images_per_s", "end_to_end_images_per_s",
           "end_to_end_vs_model_only", "steady_end_to_end_images_per_s", "steady_end_to_end_vs_model_only",
           "end_to_end_first_batch_ms"}


def test_tiny_report_keeps_its_keys(tmp_path):
    out = tmp_path / "tiny.json"
    argv = ["--images", "2", "--batch-size", "2", "--width", "64", "--height", "48", "--repeats", "1",
            "--workers", "0", "--skip-predict", "--output", str(out)]
    assert datapath.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == TINY_KEYS
    assert set(report["loader"]) == {"predict", "evaluate"} and set(report["loader"]["predict"]) == {"0"}


def test_model_report_on_the_cpu_measures_bfloat16_and_4bit_on_the_same_images(tmp_path):
    """The GPU benchmark's code on the CPU (the device pinned: a CPU run), the `small` preset cut to one text layer
    and one vision block: model-only and end-to-end images/s, their ratio, peak memory, then the same after a save
    and a 4-bit reload; the saved bundle and the images are gone at the end."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no 4-bit reload to measure")
    out, work = tmp_path / "small.json", tmp_path / "work"
    work.mkdir()
    argv = ["--config", "small", "--device", "cpu", "--text-layers", "1", "--vision-blocks", "1", "--images", "4",
            "--batch-size", "2", "--width", "64", "--height", "64", "--image-size", "56", "--repeats", "1",
            "--workers", "1", "--tmp-dir", str(work), "--output", str(out)]
    assert datapath.main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["config"], report["device"], report["dtype"], report["batch_size"]) == ("small", "cpu",
                                                                                            "bfloat16", 2)
    shape = report["shape"]
    assert (shape["text_layers"], shape["vision_blocks"], shape["hidden_size"]) == (1, 1, 448)
    assert shape["full_depth"] is False and shape["params"] > 0
    for name in ("bfloat16", "4bit"):
        figures = report[name]
        assert FIGURES <= set(figures), name
        assert figures["image_tokens"] == [4]  # square images at 56 x 56 px: 4 x 4 patches merged 2 x 2
        assert figures["memory"]["peak_mb"] > 0
        assert figures["end_to_end_vs_model_only"] == pytest.approx(
            figures["end_to_end_images_per_s"] / figures["model_only_images_per_s"], rel=1e-2, abs=1e-3)
        assert figures["steady_end_to_end_vs_model_only"] == pytest.approx(
            figures["steady_end_to_end_images_per_s"] / figures["model_only_images_per_s"], rel=1e-2, abs=1e-3)
    assert report["4bit"]["memory"]["weights_mb"] < report["bfloat16"]["memory"]["weights_mb"]
    assert report["4bit_vs_bfloat16"]["peak_mb"] == pytest.approx(
        report["4bit"]["memory"]["peak_mb"] / report["bfloat16"]["memory"]["peak_mb"], abs=1e-3)
    assert list(work.iterdir()) == []  # the images and the saved bundle removed


def test_model_report_without_cuda_stops_at_once(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CPU fact: CUDA is available here")
    assert datapath.main(["--config", "7b"]) == 2  # the 7b preset runs on CUDA by default
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "CUDA is not available" in error


@pytest.mark.parametrize("argv", [["--images", "0"], ["--config", "7b", "--workers", "1,2"], ["--workers", "x"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as error:
        datapath.main(argv)
    assert error.value.code == 2


def test_the_gpu_script_names_flags_and_tests_that_exist():
    """`benchmarks/gpu_issue25.sh` runs on a lent machine in one go: its benchmark flags must parse here (a renamed
    flag would cost that run) and the test files it names must exist."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "benchmarks" / "gpu_issue25.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    (command,) = re.findall(r"^step datapath-7b \d+ \"\$PY\" -m benchmarks\.datapath (.*)$", script, flags=re.M)
    # the shell's values ("$WORK", "$OUT/...") stand for paths; ${DATAPATH_ARGS:-} is empty unless given
    argv = [arg if "$" not in arg else "placeholder" for arg in shlex.split(command) if "DATAPATH_ARGS" not in arg]
    args = datapath.parse_args(argv)
    assert (args.config, args.batch_size, args.device, args.images) == ("7b", 32, "cuda", 256)
    tests = set(re.findall(r"tests/test_\w+\.py", script))
    assert tests and all((root / test).is_file() for test in tests), tests
