"""What every stage shares: a stage folder with a `DONE.json` keyed by the stage's inputs, Trainer checkpoints
kept per key, the dtype a run computes in, and the `TrainingArguments` every stage derives its own from."""

import json
import logging
import shutil
from pathlib import Path

import torch

from emovlm_kd.distributed import barrier, is_main_process, main_process_decides
from emovlm_kd.training.cache import atomic_write_text

logger = logging.getLogger(__name__)


class Stage:
    """A stage folder with a DONE.json marker that records the fingerprint of the stage's inputs."""

    def __init__(self, run_dir, name, key):
        self.dir = Path(run_dir) / name
        self.name, self.key = name, key

    @property
    def done(self):
        """Finished with these inputs? Decided by the main process, so all processes skip or run together."""
        marker = self.dir / "DONE.json"
        return main_process_decides(lambda: marker.exists() and json.loads(marker.read_text()).get("key") == self.key)

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


def last_checkpoint(folder):
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(folder)
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def resolve_dtype(cfg):
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def base_training_arguments(cfg, output_dir):
    """What every stage's `TrainingArguments` (and stage 1's `SFTConfig`) shares: seeded, a checkpoint every epoch
    (the last one kept), on the CPU when there is no CUDA, no reporting integrations."""
    return dict(
        output_dir=str(output_dir),
        save_strategy="epoch",
        save_total_limit=1,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


def trainer_args(cfg, output_dir, epochs, lr, batch_size, **extra):
    """The `TrainingArguments` of stages 2-4: the shared base, one log line an epoch, the run's cached rows as they
    are, one global batch split across processes (the same updates under torchrun as in one process); `extra`
    overrides."""
    from transformers import TrainingArguments

    values = dict(
        base_training_arguments(cfg, output_dir),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        logging_strategy="epoch",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        accelerator_config={"split_batches": True},
    )
    values.update(extra)
    return TrainingArguments(**values)
