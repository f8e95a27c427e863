"""The data path beside the model: decoding, `prepare_image` and the processor in `torch.utils.data.DataLoader`
worker processes, so the model never waits for them.

    loader = batch_loader(rows, processor, model.config, batch_size=32, num_workers=7, pin_memory=True)
    for batch in loader:                           # in the order planned, `num_workers * 2` batches prepared ahead
        inputs, rows, errors = batch["inputs"], batch["rows"], batch["errors"]

How: the main process iterates the rows (`emovlm_kd.collection`: paths or encoded bytes, nothing decoded) and plans
the batches (`plan_batches`); each planned batch is an "index" of a map-style `DataLoader` (`sampler=` the plan,
`batch_size=None`), so a worker gets the batch's rows, decodes them and runs the processor (`PreparedBatches`), and
the loader hands the batches back in the planned order, at most `prefetch_factor * num_workers` ahead. One reader
of the input (a stream is read once, by the main process), any number of decoders.

Grouping by size: the rows are planned in windows of `group` batches; within a window they are sorted (stably) by
their image's pixel count from its header (read without decoding), so each batch holds images of similar sizes and
the prompts (whose image tokens grow with the size) are padded less. A window's records are put back in input order
before they are written (`predict` writes a row once every row before it is done; under torchrun a window of
each process per round, `windows`), so the output is in input order whatever the grouping; a resumed run plans
from the start of the window holding its position, hence the same batches as an uninterrupted one. `group=1`:
the batches in input order.

On CUDA the loader pins the batches (`pin_memory=True`) and `run_batch` copies them with `non_blocking=True`.

`evaluate` (`emovlm_kd.evaluation.runner.predict_split`) plans its own batches (a dataset split's rows, round by round
of `sharded_batches`, each batch's labels and ids carried in `Planned.meta`) and feeds them to the same loader
(`planned_loader`); with a teacher the worker builds the teacher's inputs too (`PreparedBatches(teacher_processor=)`).
The loader draws its workers' seed from a generator of its own, so the global torch RNG (seeded by a run, drawn by
a sampled `generate`) is left as it was: the same numbers with and without workers.
"""

import io
import logging
import os
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

logger = logging.getLogger(__name__)

UNREADABLE_SIZE = float("inf")  # a header that does not read: the end of its window (its error needs no batch room)


def default_workers(local_processes=1):
    """Decoding workers per process when `--num-workers` is not given: the cores this process may use (shared by
    the processes of this node), less one for the main process; at most 8, at least 0 (decoding in line)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_processes) - 1))


def header_pixels(source):
    """Width x height from an image's header (Pillow reads a few bytes, decodes nothing), `UNREADABLE_SIZE` for a
    source that does not open. The orientation does not matter (a rotated image has as many pixels)."""
    from PIL import Image

    try:
        if isinstance(source, dict):
            source = io.BytesIO(source["bytes"]) if source.get("bytes") else source.get("path")
        elif hasattr(source, "size") and not isinstance(source, (str, os.PathLike)):
            return source.size[0] * source.size[1]  # a PIL image
        with Image.open(source) as image:
            return image.size[0] * image.size[1]
    except Exception:  # whatever a broken file raises: the worker's `load_image_*` says what is wrong
        return UNREADABLE_SIZE


@dataclass
class Planned:
    """One planned batch: its window (number and how many batches it has), its rows, and `meta`: what its planner
    wants back with the prepared batch (`batch["meta"]`; evaluate: the rows' labels and ids)."""

    window: int
    batches_in_window: int
    rows: list
    meta: Any = None


def plan_batches(rows, batch_size, group=1, size=header_pixels):
    """The batches of `rows` (an iterator of `Row`), window by window of `group * batch_size` rows, each window's
    rows sorted by `size(row.source)` (stably) when `group > 1`."""
    rows = iter(rows)
    for window in range(2**62):
        chunk = list(islice(rows, batch_size * group))
        if not chunk:
            return
        if group > 1:
            chunk = sorted(chunk, key=lambda row: size(row.source))
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for batch in batches:
            yield Planned(window, len(batches), batch)


def load_row_image(source, max_side):
    """The prepared image of a row's source (a path, `{"bytes", "path"}`, or a PIL image); `ImageLoadError`."""
    from emovlm_kd.images import ImageLoadError, load_image_bytes, load_image_file
    from pipeline_emovlm_kd import prepare_image

    if isinstance(source, dict):
        if source.get("bytes"):
            return load_image_bytes(source["bytes"], max_side=max_side)
        if source.get("path"):
            return load_image_file(source["path"], max_side=max_side)
        raise ImageLoadError("the row holds no image")
    if source is None:
        raise ImageLoadError("the row holds no image")
    if isinstance(source, (str, os.PathLike)):
        return load_image_file(source, max_side=max_side)
    return prepare_image(source, max_side=max_side)


class PreparedBatches(torch.utils.data.Dataset):
    """A map-style dataset whose "indices" are `Planned` batches: `self[planned]` decodes and prepares its rows and
    runs the processor (`emovlm_kd.inference.processor_inputs`), in a `DataLoader` worker. Returns a dict: `rows`
    (`[(position, id)]`), `errors` (`{index in rows: message}` for sources that are not readable images), `inputs`
    (the processor's tensors for the others, in order; None when none is readable), `teacher_inputs`, `window`,
    `batches_in_window`, `meta` (the `Planned`'s).

    `teacher_processor` (an image classifier's image processor, evaluate's `--teacher`): `teacher_inputs` holds its
    tensors (`teacher_processor(images=..., return_tensors="pt")`) for the same readable images, each prepared at
    full size (`prepare_image` without a long-side bound: what the teacher was trained and evaluated on); else
    None. Such an image is decoded twice, once per bound, so the model's copy is exactly the one a run without a
    teacher (and `predict`) makes: a large JPEG decodes reduced for the model (`decode_reduced`), never for the
    teacher."""

    def __init__(self, processor, config, teacher_processor=None):
        self.processor, self.config, self.teacher_processor = processor, config, teacher_processor
        self.max_side = getattr(config, "max_image_side", None)

    def __getitem__(self, planned):
        from emovlm_kd.images import ImageLoadError
        from emovlm_kd.inference import processor_inputs

        images, full, errors = [], [], {}
        for i, row in enumerate(planned.rows):
            try:
                image = load_row_image(row.source, self.max_side)
                if self.teacher_processor is not None:
                    full.append(load_row_image(row.source, None))
                images.append(image)
            except ImageLoadError as error:
                errors[i] = str(error)
        inputs = dict(processor_inputs(self.processor, self.config, images)) if images else None
        teacher_inputs = None
        if self.teacher_processor is not None and full:
            teacher_inputs = dict(self.teacher_processor(images=full, return_tensors="pt"))
        return {"rows": [(row.position, row.id) for row in planned.rows], "errors": errors, "inputs": inputs,
                "teacher_inputs": teacher_inputs, "window": planned.window,
                "batches_in_window": planned.batches_in_window, "meta": planned.meta}


def as_is(batch):
    """The loader's `collate_fn`: a batch is made whole by its worker."""
    return batch


def batch_loader(rows, processor, config, batch_size, group=1, num_workers=0, pin_memory=False):
    """A `DataLoader` over `plan_batches(rows, batch_size, group)`: the batches of `PreparedBatches`, prepared by
    `num_workers` processes (0: in this one), in the planned order."""
    return planned_loader(plan_batches(rows, batch_size, group), processor, config, num_workers=num_workers,
                          pin_memory=pin_memory)


def planned_loader(plan, processor, config, num_workers=0, pin_memory=False, teacher_processor=None):
    """A `DataLoader` over the `Planned` batches of the iterable `plan` (read once, in this process, as the workers
    ask for more): `PreparedBatches(processor, config, teacher_processor)` of each, prepared by `num_workers`
    processes (0: in this one), handed back in the planned order, at most `2 * num_workers` ahead. Its workers'
    seed comes from a generator of its own (`generator=`), not from the global torch RNG."""
    extra = {"prefetch_factor": 2} if num_workers else {}
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the forked workers tokenise on one thread each
    return torch.utils.data.DataLoader(PreparedBatches(processor, config, teacher_processor), sampler=plan,
                                       batch_size=None, collate_fn=as_is, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=torch.Generator(), **extra)


def windows(records_of_batches):
    """Regroup `(batch, records)` pairs (in the planned order) into the records of each whole window, in input
    order (by position): a list per window."""
    held, seen = [], 0
    for batch, records in records_of_batches:
        held.extend(records)
        seen += 1
        if seen == batch["batches_in_window"]:
            yield sorted(held, key=lambda record: record[0])
            held, seen = [], 0
    if held:  # cannot happen: every window's batches come back
        raise RuntimeError("a window of batches came back incomplete")
