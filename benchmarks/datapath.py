"""The data path beside the model: per-image milliseconds of decode + `prepare_image` and of the processor, model-only
images/s, and end-to-end images/s of `emovlm-kd predict` on the same files (issue 25's CPU benchmark).

Run from the repository root (the `benchmarks` package is part of the source tree, not installed):

    python -m benchmarks.datapath                                  # 16 JPEGs of 1600 x 1200, tiny bundle, CPU
    python -m benchmarks.datapath --images 32 --batch-size 8 --output datapath.json

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

Which code runs: the `emovlm_kd` and `pipeline_emovlm_kd` of this source tree (`modules` in the JSON names their
files); `predict` runs with this tree as its working directory and first on `PYTHONPATH`. To measure another
revision, export it (`git archive REV | tar -x -C DIR`), copy this file into `DIR/benchmarks/` and run it there.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(folder, count, width, height, seed=0):
    """`count` JPEGs of `width` x `height` in `folder`: a smooth random colour field plus noise (compresses like a
    photo, not like white noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3, help="passes of the data path and of the model")
    parser.add_argument("--skip-predict", action="store_true", help="leave out the end-to-end `predict` runs")
    parser.add_argument("--workers", default="0,1,2", help="the loaders' numbers of workers, comma-separated")
    parser.add_argument("--output", help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
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
        workers = [int(count) for count in args.workers.split(",") if count.strip()]
        report["loader"] = time_loaders(model, processor, paths, args.batch_size, workers, args.repeats)
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
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
