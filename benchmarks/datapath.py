"""The data path beside the model: per-image milliseconds of decode + `prepare_image` and of the processor, model-only
images/s, and end-to-end images/s of `emovlm-kd predict` on the same files (issue 25's CPU benchmark);
`--config 7b`: model-only against end-to-end images/s and the peak memory of bfloat16 and 4-bit on a GPU.

Run from the repository root (the `benchmarks` package is part of the source tree, not installed):

    python -m benchmarks.datapath                                  # 16 JPEGs of 1600 x 1200, tiny bundle, CPU
    python -m benchmarks.datapath --images 32 --batch-size 8 --output datapath.json
    python -m benchmarks.datapath --config 7b --output datapath-7b.json    # the GPU figures: Qwen2-VL-7B's shape, CUDA
    python -m benchmarks.datapath --config small --text-layers 1 --vision-blocks 1 --images 8 --batch-size 4

The JPEGs (smooth random colour fields with noise, quality 90) are written on the spot into a temporary folder with
the tiny bundle (`emovlm_kd.tiny.build_tiny_bundle`, saved there); nothing is downloaded. Figures (wall clock,
`time.perf_counter`; medians over `--repeats` passes where said):

- `decode_prepare_ms`: per image, `emovlm_kd.images.load_image_file(path, max_side=config.max_image_side)` (open,
  decode, EXIF orientation, RGB, long side <= 1024), median over the passes of the mean per image.
- `processor_ms`: per image, `emovlm_kd.inference.model_inputs` on batches of `--batch-size` prepared images (the
  chat-formatted prompt and the image processor, as `predict` builds them), median over the passes.
- `data_path_ms`: the sum of the two, what one process spends per image before the model sees it.
- `loader`: the data path as the commands run it, with no model behind it, for each of `--workers` (0, 1, 2):
  `wall_ms_per_image` (wall time from creating the `DataLoader` to its last batch, worker start-up included, over
  the images; median over the passes), `images_per_s` (its inverse) and `first_batch_ms` (the wait for the first
  batch). `predict`: `emovlm_kd.datapath.batch_loader` over the files (`--group-batches 1`); `evaluate`:
  `planned_loader(runner.dataset_batches(...))` over a `datasets.Dataset` of the same files (an `Image()` column of
  paths, as `load_image_dataset` makes of a folder). What one process's loader delivers per second.
- `model_only_images_per_s`: `model(**inputs, prompt_cache=...)` on the prebuilt batches (score mode).
- `predict_images_per_s`: `python -m emovlm_kd.cli predict --model BUNDLE FOLDER --output out.jsonl` on the same
  files, in a fresh process: all images over the whole run's wall time (start-up included), and
  `predict_images_per_s_after_startup`: the images after the first over (wall time of all - wall time of a run on
  the first image alone), which takes out interpreter start, imports and the model load.
- `load_average`: `os.getloadavg()` before and after (the machine is shared: compare runs made back to back).

The model report (`--config 7b`, or on the CPU `--config small` / `--device cpu`; issue 25's GPU figures): a random
bundle of `benchmarks.models`' preset (`build_random_model`: `7b` is Qwen2-VL-7B's exact shape with the paper's
[1024] head, built directly on the device in `--dtype`, bfloat16 by default; `--text-layers` / `--vision-blocks` cut
its depth, and the JSON's `shape` says what ran), `--images` JPEGs of `--width` x `--height` (1024 x 1024, 256 of
them for 7b) made on the spot, batches of `--batch-size` (32), the processor's pixel budget `--image-size` squared
(7b: 448 x 448 = 256 image tokens). On the same images, for the bundle in `--dtype` and then for the same bundle
saved and reloaded with `emovlm_kd.hub.load_model(path, quantize=4)` (predict's `--load-in-4bit`: the language
model in nf4, head, gate, visual tower and lm_head in `--dtype`):

- `memory`: `benchmarks.meters.MemoryMeter` over one batch's forward (CUDA: `torch.cuda.max_memory_allocated`,
  reset before it; `peak_mb`, `above_before_mb`, `allocated_before_mb` = the weights and that batch; the CPU: the
  process's peak RSS) and `weights_mb` (`get_memory_footprint`).
- `model_only_images_per_s`: every batch prebuilt on the device (by the same loader), `model(**inputs,
  prompt_cache=...)` in score mode, after one untimed batch, the device synchronised around each pass; median of
  `--repeats` passes.
- `end_to_end_images_per_s`: what `predict` does after its start-up: `emovlm_kd.datapath.batch_loader` over the
  files (`--workers` processes, default `default_workers()`; predict's `--group-batches`; pinned memory on CUDA)
  feeding predict's own batch step (`emovlm_kd.commands.predict._predict_batch`: `run_batch` in score mode, the
  outputs to the CPU, one record per image); all images over the wall time from creating the loader (worker
  start-up and the first batch's wait included); `steady_end_to_end_images_per_s`: the images after the first batch
  over the time after it; `end_to_end_first_batch_ms`; each figure's ratio to model-only (`*_vs_model_only`).
  Median of `--repeats`.
- `4bit_vs_<dtype>`: the 4-bit load's peak memory and model-only images/s over the `--dtype` bundle's.

The report is rewritten to `--output` after each part (a `timeout` keeps what was measured); the images and the
saved bundle (about 17 GB for 7b) live in a temporary folder (`--tmp-dir`) removed at the end, on SIGTERM too.
Where `--device` is CUDA and there is none, it stops at once: one line, exit status 2.

Which code runs: the `emovlm_kd` and `pipeline_emovlm_kd` of this source tree (`modules` in the JSON names their
files); `predict` runs with this tree as its working directory and first on `PYTHONPATH`. To measure another
revision, export it (`git archive REV | tar -x -C DIR`), copy this file into `DIR/benchmarks/` and run it there.
"""

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emovlm_kd.settings import Dtype, device_field, dtype_field

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(folder, count, width, height, seed=0, first=0):
    """`count` JPEGs of `width` x `height` in `folder`: a smooth random colour field plus noise (compresses like a
    photo, not like white noise); named from `image_{first:04d}.jpg` on."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(first, first + count):
        coarse = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = Path(folder) / f"image_{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def time_data_path(model, processor, paths, batch_size, repeats):
    from emovlm_kd.images import load_image_file
    from emovlm_kd.inference import model_inputs

    max_side = model.config.max_image_side
    decode, process = [], []
    inputs = None
    for _ in range(repeats):
        start = time.perf_counter()
        images = [load_image_file(path, max_side=max_side) for path in paths]
        decode.append((time.perf_counter() - start) * 1e3 / len(paths))
        start = time.perf_counter()
        inputs = [model_inputs(model, processor, batch) for batch in batches(images, batch_size)]
        process.append((time.perf_counter() - start) * 1e3 / len(paths))
    return statistics.median(decode), statistics.median(process), inputs


def time_loader(make_loader, count, repeats):
    """`(wall ms per image, ms to the first batch)` of iterating `make_loader()` to its end, medians over the passes;
    the batches must hold `count` rows in all."""
    walls, firsts = [], []
    for _ in range(repeats):
        start, first, rows = time.perf_counter(), None, 0
        for batch in make_loader():
            first = first if first is not None else time.perf_counter() - start
            if batch["errors"]:
                raise RuntimeError(f"the loader could not read {batch['errors']}")
            rows += len(batch["rows"])
        walls.append((time.perf_counter() - start) * 1e3 / count)
        firsts.append(first * 1e3)
        if rows != count:
            raise RuntimeError(f"the loader gave {rows} rows for {count} images")
    return statistics.median(walls), statistics.median(firsts)


def time_loaders(model, processor, paths, batch_size, workers, repeats):
    """`{"predict": {workers: figures}, "evaluate": {...}}` (`time_loader`'s figures for each number of workers)."""
    import datasets

    from emovlm_kd.collection import FileInputs
    from emovlm_kd.datapath import batch_loader, planned_loader
    from emovlm_kd.evaluation.runner import dataset_batches

    split = datasets.Dataset.from_dict(
        {"image": [str(path) for path in paths], "label": [0] * len(paths)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["any"])}))
    makers = {
        "predict": lambda w: lambda: batch_loader(FileInputs(paths).rows(), processor, model.config, batch_size,
                                                  group=1, num_workers=w),
        "evaluate": lambda w: lambda: planned_loader(dataset_batches(split, batch_size), processor, model.config,
                                                     num_workers=w),
    }
    report = {}
    for path, maker in makers.items():
        for count in workers:
            logger.info("loader: %s, %d worker(s)", path, count)
            wall, first = time_loader(maker(count), len(paths), repeats)
            report.setdefault(path, {})[str(count)] = {"wall_ms_per_image": round(wall, 2),
                                                       "images_per_s": round(1e3 / wall, 2),
                                                       "first_batch_ms": round(first, 1)}
    return report


def time_model(model, inputs, count, repeats):
    import torch

    from scoring_emovlm_kd import PromptPrefixCache

    cache = PromptPrefixCache()
    runs = []
    with torch.inference_mode():
        model(**inputs[0], prompt_cache=cache)  # warm-up (and the prompt prefix)
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in inputs:
                model(**batch, prompt_cache=cache)
            runs.append(time.perf_counter() - start)
    return count / statistics.median(runs)


def run_predict(bundle, inputs, output, batch_size):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "emovlm_kd.cli", "--quiet", "predict", "--model", str(bundle),
               "--batch-size", str(batch_size), "--output", str(output), *map(str, inputs)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


PRESETS = {  # --config: the defaults of each; `tiny` is the CPU report above, the others the model report
    "tiny": {"images": 16, "batch_size": 8, "width": 1600, "height": 1200, "repeats": 3, "workers": "0,1,2",
             "device": "cpu", "dtype": None},
    "small": {"images": 64, "batch_size": 32, "width": 1024, "height": 1024, "repeats": 2, "workers": None,
              "device": "cpu", "dtype": "bfloat16"},
    "7b": {"images": 256, "batch_size": 32, "width": 1024, "height": 1024, "repeats": 2, "workers": None,
           "device": "cuda", "dtype": "bfloat16"},
}


@dataclass
class DatapathArguments:
    """The benchmark's flags (parsed by `HfArgumentParser`); `None` means the `--config` preset's value (`PRESETS`,
    resolved in `__post_init__`). A bad value raises `ValueError` (`parse_args`: exit status 2 naming the flag)."""

    config: str = field(default="tiny", metadata={
        "help": "tiny: the CPU data-path report (default); 7b / small: model-only against end-to-end images/s and "
                "peak memory, the bundle and its 4-bit reload, on benchmarks.models' random preset",
        "choices": list(PRESETS)})
    images: int | None = field(default=None, metadata={
        "help": "JPEGs made on the spot (default: tiny 16, small 64, 7b 256)"})
    batch_size: int | None = field(default=None, metadata={"help": "default: tiny 8, else 32"})
    width: int | None = field(default=None, metadata={"help": "default: tiny 1600, else 1024"})
    height: int | None = field(default=None, metadata={"help": "default: tiny 1200, else 1024"})
    repeats: int | None = field(default=None, metadata={
        "help": "passes of the data path and of the model (default: tiny 3, else 2)"})
    skip_predict: bool = field(default=False, metadata={"help": "tiny: leave out the end-to-end `predict` runs"})
    workers: str | None = field(default=None, metadata={
        "help": "the loaders' numbers of workers, comma-separated (tiny: default 0,1,2); 7b / small: one number "
                "(default: emovlm_kd.datapath.default_workers())"})
    # -- the model report (7b / small)
    device: str | None = device_field("7b: cuda; small: cpu")
    dtype: Dtype | None = dtype_field("bfloat16; 7b / small only, also the 4-bit compute dtype")
    text_layers: int | None = field(default=None, metadata={
        "help": "7b / small: text layers (default: the preset's, 7b 28)"})
    vision_blocks: int | None = field(default=None, metadata={
        "help": "7b / small: vision blocks (default: the preset's, 7b 32)"})
    image_size: int | None = field(default=None, metadata={
        "help": "7b / small: the processor's pixel budget, a square side (default: 7b 448 = 256 image tokens, "
                "small 224)"})
    skip_4bit: bool = field(default=False, metadata={
        "help": "7b / small: the --dtype bundle only (no save and 4-bit reload)"})
    skip_4bit_end_to_end: bool = field(default=False, metadata={
        "help": "7b / small: the 4-bit load's peak memory and model-only images/s, not its end-to-end"})
    tmp_dir: str | None = field(default=None, metadata={
        "help": "7b / small: where the images and the saved bundle go (a 7B bundle is about 17 GB; removed at the "
                "end), default the system's temp folder"})
    output: str | None = field(default=None, metadata={
        "help": "write the JSON report here (7b / small: rewritten after each part)"})
    worker_counts: list = field(init=False, default=None)  # --workers as integers

    def __post_init__(self):
        preset = PRESETS[self.config]
        for name in ("images", "batch_size", "width", "height", "repeats", "workers", "device", "dtype"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        for name in ("images", "batch_size", "width", "height", "repeats", "text_layers", "vision_blocks",
                     "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        try:
            self.worker_counts = None if self.workers is None else [
                int(count) for count in str(self.workers).split(",") if count.strip()]
        except ValueError:
            raise ValueError(f"--workers must be comma-separated integers, got {self.workers!r}") from None
        if self.config != "tiny" and self.worker_counts is not None and len(self.worker_counts) != 1:
            raise ValueError(f"--config {self.config} takes one --workers number, got {self.workers}")


def parse_args(argv=None):
    """DatapathArguments from the command line; a bad value exits with status 2 and says which flag."""
    from .flags import parse_settings

    return parse_settings(DatapathArguments, argv, "python -m benchmarks.datapath", __doc__.split("\n\n")[0])


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    if args.config != "tiny":
        return model_report(args)
    import torch

    import pipeline_emovlm_kd
    from emovlm_kd import tiny
    from emovlm_kd.hub import save_bundle

    load_before = os.getloadavg()
    report = {"images": args.images, "size": [args.width, args.height], "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "device": "cpu", "config": "tiny",
              "modules": {"emovlm_kd": tiny.__file__, "pipeline_emovlm_kd": pipeline_emovlm_kd.__file__}}
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-datapath-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_jpegs(folder, args.images, args.width, args.height)
        model, processor = tiny.build_tiny_bundle()
        model.eval()
        logger.info("data path: %d JPEGs of %dx%d", args.images, args.width, args.height)
        decode_ms, processor_ms, inputs = time_data_path(model, processor, paths, args.batch_size, args.repeats)
        report["loader"] = time_loaders(model, processor, paths, args.batch_size, args.worker_counts,
                                        args.repeats)
        logger.info("model only")
        model_rate = time_model(model, inputs, args.images, args.repeats)
        report.update(decode_prepare_ms=round(decode_ms, 2), processor_ms=round(processor_ms, 2),
                      data_path_ms=round(decode_ms + processor_ms, 2),
                      model_only_images_per_s=round(model_rate, 2))
        if not args.skip_predict:
            bundle = save_bundle(model, processor, Path(tmp) / "bundle")
            logger.info("emovlm-kd predict (one image, then all)")
            one = run_predict(bundle, paths[:1], Path(tmp) / "one.jsonl", args.batch_size)
            every = run_predict(bundle, [folder], Path(tmp) / "all.jsonl", args.batch_size)
            lines = (Path(tmp) / "all.jsonl").read_text(encoding="utf-8").splitlines()
            if len(lines) != args.images:
                raise RuntimeError(f"predict wrote {len(lines)} lines for {args.images} images")
            report.update(predict_s=round(every, 2), predict_one_image_s=round(one, 2),
                          predict_images_per_s=round(args.images / every, 2),
                          predict_images_per_s_after_startup=round((args.images - 1) / max(every - one, 1e-9), 2))
    report["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    write_report(report, args.output, final=True)
    return 0


def write_report(report, output, final=False):
    """The JSON report into `output` (if given); printed too when `final`."""
    text = json.dumps(report, indent=2)
    if final:
        print(text)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# The model report (--config 7b / small): model-only against end-to-end images/s, peak memory, bfloat16 and 4-bit
# ----------------------------------------------------------------------------------------------------------------


def make_jpegs_in_parallel(folder, count, width, height, processes):
    """`make_jpegs` split over `processes` spawned processes (a fresh interpreter each: nothing of CUDA is forked),
    chunk `k` seeded `k`; the paths in name order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    processes = max(1, min(processes, count))
    bounds = [count * k // processes for k in range(processes + 1)]
    if processes == 1:
        return make_jpegs(folder, count, width, height)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        chunks = [pool.submit(make_jpegs, folder, bounds[k + 1] - bounds[k], width, height, k, bounds[k])
                  for k in range(processes)]
        return [path for chunk in chunks for path in chunk.result()]


def loader_batches(model, processor, paths, batch_size, workers, pin_memory):
    """`emovlm_kd.datapath.batch_loader` over the files as `predict` builds it (its `--group-batches` default)."""
    from emovlm_kd.collection import FileInputs
    from emovlm_kd.commands.predict import CollectionArguments
    from emovlm_kd.datapath import batch_loader

    group = CollectionArguments.__dataclass_fields__["group_batches"].default
    return batch_loader(FileInputs(paths).rows(), processor, model.config, batch_size, group=group,
                        num_workers=workers, pin_memory=pin_memory)


def time_model_only(model, batches, repeats, device):
    """Images/s of `model(**batch, vlm_mode="score", prompt_cache=...)` over the prebuilt `batches` (on the model's
    device), median over `repeats` passes after one untimed batch; the device synchronised around each pass."""
    import torch

    from scoring_emovlm_kd import PromptPrefixCache

    from .meters import Stopwatch

    cache, clock, runs = PromptPrefixCache(), Stopwatch(device), []
    count = sum(batch["input_ids"].shape[0] for batch in batches)
    with torch.inference_mode():
        model(**batches[0], vlm_mode="score", prompt_cache=cache)  # warm-up (kernels, and the prompt prefix)
        for _ in range(repeats):
            clock.start()
            for batch in batches:
                model(**batch, vlm_mode="score", prompt_cache=cache)
            runs.append(clock.stop())
    return count / statistics.median(runs)


def time_end_to_end(model, processor, paths, batch_size, workers, repeats, device):
    """What `predict` does after its start-up, over the files: `batch_loader` with `workers` processes (pinned on
    CUDA) feeding `emovlm_kd.commands.predict._predict_batch` (`run_batch` with a prompt cache of the run, the
    outputs on the CPU, one record per image). Per pass: images/s over the whole loop (from creating the loader,
    worker start-up and the first batch's wait included), and images/s after the first batch's records (the steady
    state); medians over `repeats` passes, and the first batch's wait."""
    from emovlm_kd.commands.predict import _predict_batch
    from scoring_emovlm_kd import PromptPrefixCache

    from .meters import sync

    whole, steady, firsts = [], [], []
    for _ in range(repeats):
        cache, rows, first = PromptPrefixCache(), 0, None
        sync(device)
        start = time.perf_counter()
        for batch in loader_batches(model, processor, paths, batch_size, workers, device.type == "cuda"):
            records = _predict_batch(model, processor, batch, "path", cache, {"vlm_mode": "score"})
            failed = [record for _, record in records if "error" in record]
            if failed:
                raise RuntimeError(f"predict's path failed on {failed[0]}")
            rows += len(records)
            if first is None:
                first, first_rows = time.perf_counter() - start, len(records)
        wall = time.perf_counter() - start  # `_predict_batch` ends with the outputs on the CPU: nothing queued
        if rows != len(paths):
            raise RuntimeError(f"the loader gave {rows} rows for {len(paths)} images")
        whole.append(rows / wall)
        steady.append((rows - first_rows) / (wall - first) if rows > first_rows else None)
        firsts.append(first * 1e3)
    steady = None if None in steady else statistics.median(steady)  # None: a single batch has no steady state
    return statistics.median(whole), steady, statistics.median(firsts)


def peak_memory(model, inputs, device):
    """{method, weights_mb, peak_mb, above_before_mb[, allocated_before_mb]}: `benchmarks.meters.MemoryMeter` over
    one `model(**inputs)` (a fresh prompt cache), the weights' size from `get_memory_footprint`."""
    import torch

    from scoring_emovlm_kd import PromptPrefixCache

    from .meters import MemoryMeter

    meter = MemoryMeter(device)
    with torch.inference_mode():
        peak = meter.measure(lambda: model(**inputs, vlm_mode="score", prompt_cache=PromptPrefixCache()))
    memory = {"method": meter.method, "weights_mb": round(model.get_memory_footprint() / 2**20, 1), **peak}
    if device.type == "cuda":
        memory["allocated_before_mb"] = round(peak["peak_mb"] - peak["above_before_mb"], 1)
    return memory


def measure_model(model, processor, paths, args, device, end_to_end=True):
    """{image_tokens, memory, model_only_images_per_s, end_to_end_...}: the image tokens per image, the peak memory
    of one batch's forward, then model-only images/s on every batch prebuilt on the device, then (`end_to_end`)
    end-to-end images/s (`time_end_to_end`) and their ratios to model-only."""
    import torch

    from emovlm_kd.inference import to_model

    logger.info("prebuilding the batches (the loader, %d worker(s))", args.worker_counts[0])
    cpu_batches = [batch["inputs"] for batch in loader_batches(model, processor, paths, args.batch_size,
                                                               args.worker_counts[0], False)]
    merge = model.vlm.config.vision_config.spatial_merge_size
    figures = {"image_tokens": sorted({int(row.prod()) // merge**2 for inputs in cpu_batches
                                       for row in inputs["image_grid_thw"]})}
    figures["memory"] = peak_memory(model, to_model(model, cpu_batches[0]), device)
    batches = [to_model(model, inputs) for inputs in cpu_batches]
    logger.info("model only: %d batches of %d", len(batches), args.batch_size)
    model_rate = time_model_only(model, batches, args.repeats, device)
    figures["model_only_images_per_s"] = round(model_rate, 2)
    del batches, cpu_batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if end_to_end:
        logger.info("end to end: the loader with %d worker(s) feeding predict's batch step", args.worker_counts[0])
        whole, steady, first_ms = time_end_to_end(model, processor, paths, args.batch_size, args.worker_counts[0],
                                                  args.repeats, device)
        figures.update(end_to_end_images_per_s=round(whole, 2), end_to_end_vs_model_only=round(whole / model_rate, 3),
                       steady_end_to_end_images_per_s=None if steady is None else round(steady, 2),
                       steady_end_to_end_vs_model_only=None if steady is None else round(steady / model_rate, 3),
                       end_to_end_first_batch_ms=round(first_ms, 1))
    return figures


def model_report(args):
    """The model report (`measure_bundles`); 2 with a one-line message where `--device` is CUDA and there is none.
    A `timeout`'s SIGTERM unwinds like an error meanwhile, so the temporary folder (a 7B bundle: 17 GB) goes."""
    import signal

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"python -m benchmarks.datapath: error: --config {args.config} --device {args.device}: CUDA is not "
              "available (the 7b shape is 8.3 B parameters; on the CPU use --config small, or --device cpu with few "
              "--text-layers and --vision-blocks)", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        report = measure_bundles(args, device)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(report, args.output, final=True)
    return 0


def measure_bundles(args, device):
    """A random `args.config` bundle (`benchmarks.models.build_random_model`, built on `device` in `args.dtype`,
    `--text-layers` / `--vision-blocks` deep), JPEGs made on the spot, measured (`measure_model`), then saved,
    reloaded with `emovlm_kd.hub.load_model(..., quantize=4)` (predict's `--load-in-4bit`) and measured again. The
    report is rewritten to `args.output` after each part."""
    import gc

    import torch

    import emovlm_kd
    import pipeline_emovlm_kd
    from emovlm_kd.datapath import default_workers
    from emovlm_kd.hub import load_model, save_bundle

    from .models import CONFIGS, build_random_model, count_params, preset_widths

    dtype = getattr(torch, args.dtype)
    args.worker_counts = args.worker_counts or [default_workers()]
    widths = preset_widths(args.config)
    depth = {"num_layers": args.text_layers or widths["num_layers"],
             "vision_depth": args.vision_blocks or widths["vision_depth"]}
    side = args.image_size or CONFIGS[args.config]["image_size"]
    load_before = os.getloadavg()
    report = {"config": args.config, "device": str(device), "device_name": device_name(device),
              "dtype": args.dtype, "images": args.images, "size": [args.width, args.height],
              "batch_size": args.batch_size, "workers": args.worker_counts[0], "repeats": args.repeats,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "modules": {"emovlm_kd": emovlm_kd.__file__, "pipeline_emovlm_kd": pipeline_emovlm_kd.__file__}}
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-datapath-", dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        started = time.perf_counter()
        paths = make_jpegs_in_parallel(folder, args.images, args.width, args.height, os.cpu_count() or 1)
        report["make_jpegs_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        model, processor = build_random_model(args.config, image_size=side, device=device, dtype=dtype, depth=depth)
        report["build_s"] = round(time.perf_counter() - started, 1)
        text, vision = model.vlm.config.text_config, model.vlm.config.vision_config
        report["shape"] = {
            "preset": args.config, "text_layers": text.num_hidden_layers, "vision_blocks": vision.depth,
            "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size, "vision_dim": vision.embed_dim,
            "full_depth": (text.num_hidden_layers, vision.depth) == (widths["num_layers"], widths["vision_depth"]),
            "params": count_params(model), "processor_pixels": side * side}
        write_report(report, args.output)
        logger.info("%s: %s", args.dtype, report["shape"])
        report[args.dtype] = measure_model(model, processor, paths, args, device)
        write_report(report, args.output)
        if not args.skip_4bit:
            started = time.perf_counter()
            bundle = save_bundle(model, processor, Path(tmp) / "bundle")
            report["save_s"] = round(time.perf_counter() - started, 1)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            started = time.perf_counter()
            model, processor, _ = load_model(bundle, device=device, dtype=dtype, quantize=4)
            report["load_4bit_s"] = round(time.perf_counter() - started, 1)
            shutil.rmtree(bundle)  # not needed any more (the weights are in memory): the disk is free again
            report["4bit"] = {"load": "emovlm_kd.hub.load_model(path, quantize=4): the language model in nf4 "
                                      f"(double quantisation), head, gate, visual tower and lm_head in {args.dtype}",
                              **measure_model(model, processor, paths, args, device,
                                              end_to_end=not args.skip_4bit_end_to_end)}
            report["4bit_vs_" + args.dtype] = {
                "peak_mb": round(report["4bit"]["memory"]["peak_mb"] / report[args.dtype]["memory"]["peak_mb"], 3),
                "model_only_images_per_s": round(report["4bit"]["model_only_images_per_s"]
                                                 / report[args.dtype]["model_only_images_per_s"], 3)}
    report["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    return report


def device_name(device):
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
