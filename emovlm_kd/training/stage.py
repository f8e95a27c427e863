"""What every stage shares: one skeleton (`run_stage`: key -> done? -> work -> output written in a temp place and
renamed -> DONE.json), a stage folder with a `DONE.json` keyed by the stage's inputs, Trainer checkpoints kept per key
(resumed from the newest complete one), and the `TrainingArguments` values all stages share."""

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import torch

from emovlm_kd.distributed import (
    barrier,
    is_main_process,
    main_process_decides,
    world_size,
)
from emovlm_kd.folders import atomic_write_text, staged_file, staged_folder, writing

logger = logging.getLogger(__name__)


class Stage:
    """A stage folder with a DONE.json marker that records the fingerprint of the stage's inputs."""

    def __init__(self, run_dir, name, key):
        self.dir = Path(run_dir) / name
        self.name, self.key = name, key

    @property
    def done(self):
        """Finished with these inputs? Decided by the main process, so all processes skip or run together."""
        return main_process_decides(lambda: read_json(self.dir / "DONE.json").get("key") == self.key)

    def checkpoints(self):
        """The Trainer's checkpoint folder for this key; checkpoints of other settings are removed (never resumed)."""
        folder = self.dir / f"checkpoints-{self.key}"
        if is_main_process() and self.dir.is_dir():
            for stale in self.dir.glob("checkpoints-*"):
                if stale != folder:
                    logger.info("[%s] removing checkpoints of other settings: %s", self.name, stale.name)
                    shutil.rmtree(stale, ignore_errors=True)
        barrier()
        return folder

    def finish(self, **summary):
        if is_main_process():
            atomic_write_text(self.dir / "DONE.json", json.dumps({"key": self.key, **summary}, indent=2))
        barrier()
        logger.info("[%s] done: %s", self.name, ", ".join(f"{k}={v}" for k, v in summary.items()))


def run_stage(run_dir, name, key, output, work, *, skipped, log, restore=None, folder=False, damage=None,
              damaged=None):
    """The skeleton of stages 0-5; returns the path of the stage's output, `RUN/name/output`.

    Done with `key` (its DONE.json says so) and, where the stage checks its output (`damage`), undamaged:
    `restore(path)` where the caller needs the output loaded back, then the line `skipped` logged by `log` (the
    stage module's logger). Otherwise `work(stage)` runs on every process and returns `(write, summary)`; the main
    process writes the output through `write(tmp)` into a temp file (`folders.staged_file`) or, with `folder`, a
    temp folder (`folders.staged_folder`), renamed into place when complete; then DONE.json records `key` and
    `summary`. `damage(stage)`: what is wrong with a done stage's output in words, or None (decided by the main
    process); a damaged stage runs again after the warning `damaged % damage`.
    """
    stage = Stage(run_dir, name, key)
    path = stage.dir / output
    if stage.done:
        problem = main_process_decides(lambda: damage(stage)) if damage is not None else None
        if problem is None:
            if restore is not None:
                restore(path)
            log.info(skipped)
            return path
        log.warning(damaged, problem)
    write, summary = work(stage)
    if is_main_process():
        with (staged_folder if folder else staged_file)(path) as tmp:
            write(tmp)
    stage.finish(**summary)
    return path


OFFICIAL_WEIGHT_DECAY = 1e-4  # train_distillation.py:111,155 and train_gate.py:336,358: Adam(weight_decay=1e-4)


def adam(optimizer, module, lr, weight_decay=OFFICIAL_WEIGHT_DECAY):
    """`Trainer(optimizer_cls_and_kwargs=...)`: for `optimizer` `adam`, torch.optim.Adam with L2 weight decay on
    every parameter of `module` (biases included), as the official code (1e-4 for the head and the gate, whose
    constant rate is their group's `recipe`; the teacher's own); None (Trainer's AdamW) otherwise."""
    if optimizer != "adam":
        return None
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.Adam, {"params": params, "lr": lr, "weight_decay": weight_decay}


def trained(result):
    """The DONE.json summary of a stage that ran a Trainer: its final training loss and its steps."""
    return dict(train_loss=round(result.training_loss, 4), steps=result.global_step)


def read_json(path):
    """The JSON object in `path`; {} when the file is missing or not a whole JSON object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(folder):
    """The newest complete `checkpoint-N` in `folder` (see `checkpoint_problem`), or None.

    Incomplete ones (a run killed while the Trainer wrote one, or while it deleted an older one) are removed, all
    named in one log line. Decided and cleaned by the main process; every process gets the same answer.
    """
    folder = Path(folder)
    newest, incomplete = main_process_decides(lambda: survey_checkpoints(folder))
    if incomplete and is_main_process():
        logger.warning("%s: removing incomplete checkpoints (a run stopped while writing or deleting them): %s",
                       folder, "; ".join(f"{name}: {problem}" for name, problem in incomplete.items()))
        for name in incomplete:
            shutil.rmtree(folder / name, ignore_errors=True)
    barrier()
    return None if newest is None else str(folder / newest)


def survey_checkpoints(folder):
    """(the name of the newest complete checkpoint or None, {name: problem} of the incomplete ones) in `folder`: every
    `checkpoint-N` the Trainer's own `sort_checkpoints` lists (oldest first), each checked by `checkpoint_problem`."""
    from transformers.trainer_utils import sort_checkpoints

    listed = [Path(path).name for path in sort_checkpoints(str(folder))] if folder.is_dir() else []
    found = [name for name in listed if CHECKPOINT_NAME.match(name)]  # its glob also lists `checkpoint-2-old`
    problems = {name: checkpoint_problem(folder / name, int(CHECKPOINT_NAME.match(name)[1])) for name in found}
    complete = [name for name in found if not problems[name]]
    return (complete[-1] if complete else None), {name: problem for name, problem in problems.items() if problem}


def checkpoint_problem(checkpoint, step):
    """Why the Trainer checkpoint folder `checkpoint` (of global step `step`) cannot be resumed from; "" if it can.

    Complete means: what `Trainer._save_checkpoint` writes is there and whole: the weights (`model.safetensors`,
    sharded or not, or a PEFT `adapter_model.safetensors`), `training_args.bin`, `optimizer.pt`, `scheduler.pt`, the
    RNG state (`rng_state.pth`, or `rng_state_<i>.pth` for each of this run's processes) and, written last,
    `trainer_state.json` recording `step`. Whole means: every `.json` parses, every `.safetensors` is as long as its
    header says, every `.pt` / `.pth` / `.bin` (torch.save's zip format) has its zip directory at the end.
    """
    names = {p.name for p in checkpoint.iterdir() if p.is_file()}
    required = {"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json"}
    if "rng_state.pth" not in names:
        required |= {f"rng_state_{i}.pth" for i in range(world_size())} if world_size() > 1 else {"rng_state.pth"}
    weights = {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"} & names
    if "model.safetensors.index.json" in names:
        required |= set(read_json(checkpoint / "model.safetensors.index.json").get("weight_map", {}).values())
    missing = sorted(required - names) + ([] if weights else ["weights (model.safetensors, adapter_model.safetensors)"])
    if missing:
        return "no " + ", ".join(missing)
    broken = sorted(name for name in names if not file_is_whole(checkpoint / name))
    if broken:
        return "cut short: " + ", ".join(broken)
    if read_json(checkpoint / "trainer_state.json").get("global_step") != step:
        return f"trainer_state.json is not of step {step}"
    return ""


def file_is_whole(path):
    """Whether a file of a kind whose end can be checked is complete (JSON, safetensors, torch.save's zip);
    True for other kinds."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            return safetensors_is_whole(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):
                pass
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return True


def safetensors_is_whole(path):
    """Whether safetensors opens `path`: it checks on opening that the header parses and that the data its offsets
    describe ends exactly at the end of the file (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except SafetensorError:
        return False


def run_trainer(trainer, resume_from_checkpoint=None):
    """`trainer.train(...)` with its log dicts in STAGE/trainer_log.jsonl (beside the checkpoints folder) instead of
    stdout, and its progress bar on a terminal only; a Trainer that logs nothing (the ablations) writes no file."""
    from emovlm_kd.logs import route_trainer_logs

    strategy = getattr(trainer.args.logging_strategy, "value", trainer.args.logging_strategy)
    log = None if strategy == "no" else Path(trainer.args.output_dir).parent / "trainer_log.jsonl"
    route_trainer_logs(trainer, log)
    with writing(trainer.args.output_dir):  # a full disk while a checkpoint is saved: one line naming the folder
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)


def base_training_arguments(output_dir, seed):
    """What every stage's `TrainingArguments` (and stage 1's `SFTConfig`) shares: seeded, a checkpoint every epoch
    (the last one kept), on the CPU when there is no CUDA, no reporting integrations (`arguments.
    training_arguments` adds the stage's own)."""
    return dict(
        output_dir=str(output_dir),
        save_strategy="epoch",
        save_total_limit=1,
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
