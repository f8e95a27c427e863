"""Speed and memory of our inference and training stages against the paper's protocol and the floor.

Run from the repository root (the `benchmarks` package is part of the source tree, not installed):

    python -m benchmarks.bench [--config small|tiny|7b] [--batch-sizes 1,8] [--output bench.json]
    python -m benchmarks.bench --config tiny                                   # the test-suite model, seconds
    python -m benchmarks.bench --config 7b --output bench-7b.json              # Qwen2-VL-7B's shape, random, CUDA
    python -m benchmarks.bench --config 7b --train --output train-7b.json      # stage 1 QLoRA at 7B widths, CUDA
    python -m benchmarks.bench --config 7b --backbone qwen2_5_vl               # Qwen2.5-VL-7B's shape (qwen3_vl: 8B)
    python -m benchmarks.bench --model Qwen/Qwen2-VL-7B-Instruct --device cuda --batch-sizes 1,8,32 --output 7b.json
    python -m benchmarks.bench --model path/to/emovlm-kd-bundle --device cuda --output bench-bundle.json

All protocols run in one process on the same weights, dtype, device and preprocessed inputs (preprocessing is timed
for none of them). Timed calls are interleaved round by round (ours, the reference, the floor, ...) after warm-up
rounds, so that a change of load hits every figure alike; each figure is the median over `--runs` rounds. On Linux a
round during which other processes used more than `--max-other-load` of the CPUs is repeated (up to 3 x `--runs`
rounds; the JSON lists the load seen in every round). Torch uses `--threads` intra-op threads (default: every CPU
this process may run on).

- `predict_ms`: our inference per image at batch 1, `model(**inputs)` in `score` mode: one visual-encoder pass whose
  tokens feed the head and the language model; every label's answer scored inside one prefill (token trie, tree
  attention mask); the head; the gate.
- `reference_ms`: the paper's protocol (official code) on the same backbone at batch 1: the head reads a *copy* of the
  visual encoder (its own encoder pass), then `generate(do_sample=True, temperature=0.8)` with `pixel_values` (a second
  encoder pass inside), forced to exactly the true answer's token count (`min_new_tokens = max_new_tokens`: a random
  model never stops; a trained one also emits its end-of-turn token, one step more, so this is a lower bound of the
  reference's cost); the text is parsed into a one-hot vector and fed to the gate with the head's probabilities.
- `lower_bound_ms`: one encoder pass + one prefill of prompt + image (no cache, logits of the last position only),
  nothing else.
- `per_image_ms`: our inference divided by the batch size, for each `--batch-sizes` entry.
- `distill_stage` / `gate_stage`: the distillation stage (5 epochs) and the gate stage (10 epochs) over
  `--stage-images` random images. Ours is the training code itself: one batched pass caches what the stage needs
  (pooled encoder features for the head; the VLM branch's vector and the head's probabilities for the gate), then
  `emovlm_kd.training.heads.train_head` / `train_gate` (HF Trainer, mini-batches of 32) run the epochs on the cached
  tensors (`ours_cache_s` + `ours_train_s` = `ours_s`; an untimed one-epoch call on two rows first keeps the Trainer
  stack's imports out of the timing). Reference (official code): at batch 1, every epoch reruns the
  copied encoder for the head (both stages) and regenerates the VLM's sampled answer (gate stage). Teacher logits are
  precomputed for both (the teacher's cost is left out of both). The reference's gate stage is measured over
  `--reference-gate-epochs` full epochs and scaled to all epochs (each epoch does the same work):
  `reference_epochs_measured` in the JSON.
- `memory`: on CUDA, `torch.cuda.max_memory_allocated` during one call of each protocol (`peak_mb`) and that minus
  what was allocated before the call (`above_before_mb`). On the CPU, the process's peak resident set size (`VmHWM`,
  reset before each measured call through `/proc/self/clear_refs`; where that is impossible, `ru_maxrss`, never reset),
  with the same two figures. `weights_mb`: bytes of parameters and buffers each protocol holds (the reference holds a
  second visual encoder).
- `params`: backbone, visual encoder, head and gate of the measured model; `params_qwen2_vl_7b`: the same at
  Qwen2-VL-7B's real size with the paper's [1024] head and Concat & Linear gate over 8 labels, the backbone counted
  from its config on the `meta` device (nothing downloaded); `params_real_size`: the same for the `--backbone`'s real
  model (Qwen2-VL-7B, Qwen2.5-VL-7B or Qwen3-VL-8B), named in it.
- `checks`: the fast score path against a brute-force per-label log-likelihood (one full forward per label, with the
  VLM's own encoder pass), and batched answers against one-at-a-time answers.
- `targets`: the issue's targets, which are set for the CPU and the `small` config (`targets_apply`).

Configs: `small` (default) is Qwen2-VL-7B's shape scaled down: widths / 8 (text 448, MLP 2368, vision 160), depths / 4
(7 text layers, 8 vision blocks), text heads 7 query : 1 key-value (7B: 28 : 4) of dim 64, vision heads of dim 80 (as in
7B), a 32768-row vocabulary, a 224x224 image (256 patches, 64 LLM tokens), the FI prompt and labels (Mikels 8), a
[128] head (1024 / 8): 58M parameters, float32. `tiny` is the test-suite model (seconds). `7b` is Qwen2-VL-7B's
exact shape (8,291,375,616 parameters; the tiny offline tokenizer, its ids inside the 7B vocabulary) with the paper's
[1024] head, random weights built directly on the GPU in bfloat16 (nothing downloaded; `--device cuda` and
`--dtype bfloat16` by default, so it stops at once where CUDA is missing), 448 x 448 images (256 image tokens),
batch sizes 1, 8 and 32, and its own targets (the issue's GPU ones: `predict_ms` <= 25, `per_image_ms` at batch 32
<= 10; `targets_apply` on CUDA). Its JSON holds `predict_ms`, `reference_ms` (the paper's protocol),
`lower_bound_ms` (the floor), `per_image_ms["32"]` and, in `memory`, the peak of each (`predict`, `reference`,
`lower_bound`, `predict_batch_32`).

`--train` measures stage 1 instead: the base saved as safetensors and loaded as `emovlm_kd.training.sft` loads it
(`quantization_config`: 4-bit nf4, double quantisation on CUDA; LoRA r 8 on the LLM's q, k, v from `model_config`;
gradient checkpointing with 4-bit), TRL's `SFTTrainer` on prompt / completion rows over random images,
`--train-warmup-steps` untimed steps then `--train-steps` timed ones of `--train-batch-size` images: `stage1` in the
JSON holds `steps_per_s`, `s_per_step`, the peak memory of the whole `train()` call and a label saying what was
built. With `--config 7b` the model has 7B widths but 4 text layers and 4 vision blocks (2,147,020,288 parameters);
`s_per_step_scaled_to_full_depth` scales the step time by 28 / 4 (a rough estimate, labelled as such).

On a GPU with a real checkpoint, `--model` takes a Qwen2-VL checkpoint (Hub name or folder; a random head and gate
are added, which does not change their cost) or an EmoVLM-KD bundle folder; the dtype defaults to bfloat16 there.
It needs about 18 GB of GPU memory for the 7B weights plus the reference's 1.4 GB encoder copy, more for large
batches. The reference's gate stage dominates the run time; `--stage-images` and `--reference-gate-epochs` shorten it.

The pieces: `models.py` (models, inputs, sizes), `meters.py` (clocks, memory), `reference.py` (the paper's protocol
and the floor), `stages.py` (the training stages), `runner.py` (the steps in order), `report.py` (targets, table).
"""

import logging
import sys
import time
from dataclasses import dataclass, field

from emovlm_kd.settings import Dtype, device_field, dtype_field

from .flags import parse_settings
from .meters import available_cpus
from .models import CONFIGS, REAL_SIZES

logger = logging.getLogger(__name__)

GATE_EPOCHS, DISTILL_EPOCHS = 10, 5


@dataclass
class BenchArguments:
    """The benchmark's flags; `None` means the `--config` preset's value (resolved in `__post_init__`)."""

    # -- Model
    config: str = field(default="small", metadata={"help": "random model to build", "choices": sorted(CONFIGS)})
    backbone: str = field(default="qwen2_vl", metadata={
        "help": "the random model's backbone model_type (7b: Qwen2-VL-7B's, Qwen2.5-VL-7B's or Qwen3-VL-8B's shape; "
                "small: qwen2_vl only)", "choices": list(REAL_SIZES)})
    model: str | None = field(default=None, metadata={
        "help": "a Qwen2-VL checkpoint or EmoVLM-KD bundle (name or folder)"})
    device: str | None = device_field("cpu; 7b: cuda")
    dtype: Dtype | None = dtype_field("bfloat16 for 7b and for --model on CUDA, else float32")
    image_size: int | None = field(default=None, metadata={"help": "square image side (default 224; 7b 448; tiny 56)"})
    seed: int = 0
    # -- Timing
    batch_sizes: str | None = field(default=None, metadata={
        "help": "comma-separated batch sizes for per-image time (default 1,8; 7b 1,8,32)"})
    runs: int | None = field(default=None, metadata={"help": "timed rounds (median reported; default 15, tiny 5)"})
    warmup: int | None = field(default=None, metadata={"help": "untimed rounds first"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: CPUs available)"})
    max_other_load: float = field(default=0.1, metadata={
        "help": "repeat a timing round when other processes used more than this share of the CPUs during it (Linux)"})
    # -- Training stages
    skip_stages: bool = field(default=False, metadata={"help": "only the inference figures"})
    stage_images: int | None = field(default=None, metadata={"help": "images in the stage timings"})
    gate_epochs: int = GATE_EPOCHS
    distill_epochs: int = DISTILL_EPOCHS
    reference_gate_epochs: int | None = field(default=None, metadata={
        "help": "reference gate-stage epochs actually measured (scaled to --gate-epochs); default: small 2, tiny all"})
    # -- Stage 1 (--train)
    train: bool = field(default=False, metadata={
        "help": "instead of the inference figures: stage 1 (QLoRA, LoRA on the LLM's q, k, v) steps per second and "
                "peak memory; with --config 7b at 7B widths and 4 text layers, 4 vision blocks (needs CUDA)"})
    train_steps: int = field(default=10, metadata={"help": "--train: timed optimizer steps"})
    train_warmup_steps: int = field(default=2, metadata={"help": "--train: untimed steps first"})
    train_batch_size: int = field(default=4, metadata={"help": "--train: images per step"})
    # -- Output
    output: str | None = field(default=None, metadata={"help": "write the JSON report here"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING ..."})
    sizes: list = field(init=False, default=None)  # --batch-sizes as sorted integers

    def __post_init__(self):
        self._apply_preset()
        if self.backbone != "qwen2_vl" and (self.model or self.config == "small"):
            raise ValueError(f"--backbone {self.backbone} goes with --config 7b or tiny (--config small is Qwen2-VL's "
                             "shape scaled down; --model brings its own backbone)")
        self.sizes = _parse_batch_sizes(self.batch_sizes)
        for name in ("runs", "stage_images", "image_size", "gate_epochs", "distill_epochs", "reference_gate_epochs",
                     "threads", "train_steps", "train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.train_warmup_steps < 0:
            raise ValueError(f"--warmup and --train-warmup-steps must be >= 0, got {self.warmup}, "
                             f"{self.train_warmup_steps}")
        if not 0.0 <= self.max_other_load <= 1.0:
            raise ValueError(f"--max-other-load must be in [0, 1], got {self.max_other_load}")
        if self.image_size < 28:
            raise ValueError(f"--image-size must be >= 28, got {self.image_size}")
        if self.device and self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                preset = " (the default of --config 7b: Qwen2-VL-7B's shape in bfloat16, 8.3 B parameters)" if (
                    self.config == "7b") else ""
                raise ValueError(f"--device {self.device}{preset}: CUDA is not available")

    def _apply_preset(self):
        preset = CONFIGS[self.config]
        for name in ("runs", "warmup", "stage_images", "image_size", "batch_sizes", "device", "dtype"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        if self.reference_gate_epochs is None:
            self.reference_gate_epochs = preset["reference_gate_epochs"] or self.gate_epochs
        self.reference_gate_epochs = min(self.reference_gate_epochs, self.gate_epochs)
        if self.threads is None:
            self.threads = available_cpus()


def _parse_batch_sizes(text):
    try:
        sizes = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def parse_args(argv=None):
    """BenchArguments from the command line; a bad value exits with status 2 and says which flag."""
    return parse_settings(BenchArguments, argv, "python -m benchmarks.bench",
                          "Speed and memory of EmoVLM-KD against the paper's protocol and the floor.")


def main(argv=None):
    args = parse_args(argv)
    from emovlm_kd.logs import setup_logging

    setup_logging(args.log_level)  # the CLI's: our format on stderr, the libraries' expected notices (bitsandbytes'
    # optional CPU kernel, imported with PEFT) dropped where they are emitted
    from transformers.utils import logging as hf_logging

    from .report import format_table, write_json
    from .runner import run_benchmark, run_train_benchmark

    hf_logging.set_verbosity_warning()
    started = time.perf_counter()
    report = run_train_benchmark(args) if args.train else run_benchmark(args)
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(report))
    if args.output:
        write_json(report, args.output)
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
