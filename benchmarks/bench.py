"""`emovlm-kd bench`: speed and memory of our inference and training stages against the paper's protocol and the floor.

    emovlm-kd bench [--config small|tiny] [--batch-sizes 1,8] [--output bench.json]
    emovlm-kd bench --model Qwen/Qwen2-VL-7B-Instruct --device cuda --output bench-7b.json
    emovlm-kd bench --model path/to/emovlm-kd-bundle --device cuda --output bench-bundle.json

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
  `--stage-images` random images. Ours: one batched pass caches what the stage needs (pooled encoder features for the
  head; the VLM branch's vector and the head's probabilities for the gate), then the epochs run over the cached
  tensors (mini-batches of 32). Reference (official code): at batch 1, every epoch reruns the copied encoder for the
  head (both stages) and regenerates the VLM's sampled answer (gate stage). Teacher logits are precomputed for both
  (the teacher's cost is left out of both). The reference's gate stage is measured over `--reference-gate-epochs` full
  epochs and scaled to all epochs (each epoch does the same work): `reference_epochs_measured` in the JSON.
- `memory`: on CUDA, `torch.cuda.max_memory_allocated` during one call of each protocol (`peak_mb`) and that minus
  what was allocated before the call (`above_before_mb`). On the CPU, the process's peak resident set size (`VmHWM`,
  reset before each measured call through `/proc/self/clear_refs`; where that is impossible, `ru_maxrss`, never reset),
  with the same two figures. `weights_mb`: bytes of parameters and buffers each protocol holds (the reference holds a
  second visual encoder).
- `params`: backbone, visual encoder, head and gate of the measured model; `params_qwen2_vl_7b`: the same at
  Qwen2-VL-7B's real size with the paper's [1024] head and Concat & Linear gate over 8 labels, the backbone counted
  from its config on the `meta` device (nothing downloaded).
- `checks`: the fast score path against a brute-force per-label log-likelihood (one full forward per label, with the
  VLM's own encoder pass), and batched answers against one-at-a-time answers.
- `targets`: the issue's targets, which are set for the CPU and the `small` config (`targets_apply`).

Configs: `small` (default) is Qwen2-VL-7B's shape scaled down: widths / 8 (text 448, MLP 2368, vision 160), depths / 4
(7 text layers, 8 vision blocks), text heads 7 query : 1 key-value (7B: 28 : 4) of dim 64, vision heads of dim 80 (as in
7B), a 32768-row vocabulary, a 224x224 image (256 patches, 64 LLM tokens), the FI prompt and labels (Mikels 8), a
[128] head (1024 / 8): 58M parameters, float32. `tiny` is the test-suite model (seconds).

On a GPU with a real checkpoint, `--model` takes a Qwen2-VL checkpoint (Hub name or folder; a random head and gate
are added, which does not change their cost) or an EmoVLM-KD bundle folder; the dtype defaults to bfloat16 there:

    emovlm-kd bench --model Qwen/Qwen2-VL-7B-Instruct --device cuda --batch-sizes 1,8,32 --output bench-7b.json

It needs about 18 GB of GPU memory for the 7B weights plus the reference's 1.4 GB encoder copy, more for large
batches. The reference's gate stage dominates the run time; `--stage-images` and `--reference-gate-epochs` shorten it.
"""

import copy
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time

logger = logging.getLogger(__name__)

# Qwen2-VL-7B(-Instruct)'s architecture, from its config.json (written down: nothing is downloaded).
QWEN2_VL_7B = {
    "text_config": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False,
    ),
    "vision_config": dict(
        depth=32,
        embed_dim=1280,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        hidden_size=3584,
        in_chans=3,
    ),
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}
PAPER_HEAD_HIDDEN = [1024]

CONFIGS = {
    "small": {
        "widths": dict(
            hidden_size=448,  # 3584 / 8
            num_layers=7,  # 28 / 4
            num_heads=7,  # head_dim 64
            vision_dim=160,  # 1280 / 8
            vision_depth=8,  # 32 / 4
            text=dict(
                vocab_size=32768,
                intermediate_size=2368,  # 18944 / 8
                num_key_value_heads=1,  # 28:4 query:key-value heads -> 7:1
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},  # [16, 24, 24] for head_dim 64
            ),
            vision=dict(num_heads=2, mlp_ratio=4),  # head_dim 80 as in 7B
        ),
        "head_hidden_sizes": [128],  # 1024 / 8
        "image_size": 224,
        "stage_images": 192,
        "runs": 15,
        "warmup": 2,
        "reference_gate_epochs": 2,
    },
    "tiny": {
        "widths": {},
        "head_hidden_sizes": [64],
        "image_size": 56,
        "stage_images": 8,
        "runs": 5,
        "warmup": 1,
        "reference_gate_epochs": None,  # all
    },
}

TARGETS = {  # the targets (CPU, small config)
    "predict_vs_reference": ("<=", 0.5),
    "predict_vs_lower_bound": ("<=", 1.15),
    "gate_stage_speedup": (">=", 8.0),
    "distill_stage_speedup": (">=", 4.0),
    "batched_per_image_vs_batch_1": ("<", 1.0),
    "visual_encoders": ("==", 1),
    "head_gate_share_7b": ("<=", 0.005),
}

GATE_EPOCHS, DISTILL_EPOCHS = 10, 5
STAGE_MINIBATCH = 32


def add_arguments(parser):
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small", help="random model to build")
    parser.add_argument("--model", default=None, help="a Qwen2-VL checkpoint or EmoVLM-KD bundle (name or folder)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes for per-image time")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu for random models)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (median reported; default 15, tiny 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available)")
    parser.add_argument(
        "--max-other-load", type=float, default=0.1,
        help="repeat a timing round when other processes used more than this share of the CPUs during it (Linux)",
    )
    parser.add_argument("--stage-images", type=int, default=None, help="images in the stage timings")
    parser.add_argument("--gate-epochs", type=int, default=GATE_EPOCHS)
    parser.add_argument("--distill-epochs", type=int, default=DISTILL_EPOCHS)
    parser.add_argument(
        "--reference-gate-epochs", type=int, default=None,
        help="reference gate-stage epochs actually measured (scaled to --gate-epochs); default: small 2, tiny all",
    )
    parser.add_argument("--image-size", type=int, default=None, help="square image side (default 224; tiny 56)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-stages", action="store_true", help="only the inference figures")


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse_batch_sizes(text):
    from emovlm_kd.errors import UsageError

    try:
        sizes = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got {text!r}")
    if not sizes or sizes[0] < 1:
        raise UsageError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def _check_args(args):
    from emovlm_kd.errors import UsageError

    preset = CONFIGS[args.config]
    settings = {
        "batch_sizes": _parse_batch_sizes(args.batch_sizes),
        "runs": args.runs if args.runs is not None else preset["runs"],
        "warmup": args.warmup if args.warmup is not None else preset["warmup"],
        "stage_images": args.stage_images if args.stage_images is not None else preset["stage_images"],
        "image_size": args.image_size if args.image_size is not None else preset["image_size"],
        "gate_epochs": args.gate_epochs,
        "distill_epochs": args.distill_epochs,
    }
    ref_epochs = args.reference_gate_epochs
    if ref_epochs is None:
        ref_epochs = preset["reference_gate_epochs"] or args.gate_epochs
    settings["reference_gate_epochs"] = min(ref_epochs, args.gate_epochs)
    for name in ("runs", "stage_images", "image_size", "gate_epochs", "distill_epochs", "reference_gate_epochs"):
        if settings[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["warmup"] < 0:
        raise UsageError(f"--warmup must be >= 0, got {settings['warmup']}")
    settings["threads"] = args.threads if args.threads is not None else available_cpus()
    if settings["threads"] < 1:
        raise UsageError(f"--threads must be >= 1, got {settings['threads']}")
    if not 0.0 <= args.max_other_load <= 1.0:
        raise UsageError(f"--max-other-load must be in [0, 1], got {args.max_other_load}")
    settings["max_other_load"] = args.max_other_load
    if settings["image_size"] < 28:
        raise UsageError(f"--image-size must be >= 28, got {settings['image_size']}")
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------


def build_random_model(config_name, seed=0, image_size=None):
    """(model, processor): a randomly initialised EmoVLM-KD bundle over the FI labels, built offline."""
    import torch

    from emovlm_kd.labels import MIKELS8
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_tokenizer, build_tiny_vlm
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    preset = CONFIGS[config_name]
    side = image_size or preset["image_size"]
    tokenizer = build_tiny_tokenizer()
    if config_name == "tiny":
        processor = build_tiny_processor(tokenizer)
    else:  # the image keeps its size: 224 x 224 -> 16 x 16 patches -> 64 LLM tokens
        processor = build_tiny_processor(tokenizer, min_pixels=side * side, max_pixels=side * side)
    vlm = build_tiny_vlm(processor.tokenizer, seed=seed, **copy.deepcopy(preset["widths"]))
    torch.manual_seed(seed + 1)
    model = EmoVLMKDForImageClassification.from_vlm(
        vlm, MIKELS8, processor=processor, head_hidden_sizes=preset["head_hidden_sizes"]
    )
    return model.eval(), processor


def load_model(name_or_path, dtype=None):
    """(model, processor) from an EmoVLM-KD bundle, or a Qwen2-VL checkpoint wrapped with a random head and gate."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from emovlm_kd.labels import MIKELS8
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
    if getattr(config, "model_type", None) == "emovlm_kd":
        from emovlm_kd.hub import load_bundle

        model, processor = load_bundle(name_or_path, dtype=dtype)
        model.set_answer_tokens(processor)
        return model.eval(), processor
    kwargs = {"dtype": dtype} if dtype is not None else {}
    vlm = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    torch.manual_seed(0)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, MIKELS8, processor=processor)
    model.distill_head.to(vlm.dtype)
    model.gate.to(vlm.dtype)
    return model.eval(), processor


def random_images(count, side, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def make_inputs(model, processor, images):
    from pipeline_emovlm_kd import prepare_inputs

    inputs = prepare_inputs(processor, model.config, images).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def split_inputs(inputs):
    """One unpadded batch-1 input per row of a (left- or right-padded) batch."""
    import torch

    counts = inputs["image_grid_thw"].prod(-1).tolist()
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        valid = inputs["attention_mask"][b].bool()
        rows.append(
            {
                "input_ids": inputs["input_ids"][b][valid][None],
                "attention_mask": torch.ones_like(inputs["input_ids"][b][valid][None]),
                "mm_token_type_ids": inputs["mm_token_type_ids"][b][valid][None],
                "pixel_values": inputs["pixel_values"][offsets[b] : offsets[b + 1]],
                "image_grid_thw": inputs["image_grid_thw"][b : b + 1],
            }
        )
    return rows


def brute_force_log_likelihoods(model, inputs):
    """The slow, obvious score: per sample and label, one full forward of prompt + that label's answer tokens with
    the VLM's own encoder pass, summing the answer tokens' log-probabilities. (B, C), float32."""
    import torch

    answers = model.config.label_answer_token_ids
    out = torch.zeros(inputs["input_ids"].shape[0], len(answers))
    with torch.inference_mode():
        for b, row in enumerate(split_inputs(inputs)):
            for c, answer in enumerate(answers):
                answer_ids = torch.tensor([answer], device=row["input_ids"].device)
                ids = torch.cat([row["input_ids"], answer_ids], dim=1)
                logits = model.vlm(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=row["pixel_values"],
                    image_grid_thw=row["image_grid_thw"],
                    mm_token_type_ids=torch.cat([row["mm_token_type_ids"], torch.zeros_like(answer_ids)], dim=1),
                ).logits
                log_probs = logits[0, -len(answer) - 1 : -1].float().log_softmax(-1)
                out[b, c] = log_probs.gather(-1, answer_ids[0][:, None]).sum().cpu()
    return out


class ReferenceProtocol:
    """The official code's inference on our backbone: a copied visual encoder for the head, sampled generation with
    `pixel_values` (the second encoder pass), the answer parsed to a one-hot vector, then the gate. Batch size 1."""

    def __init__(self, model, temperature=0.8):
        self.model = model
        self.encoder = copy.deepcopy(model.vlm.model.visual).eval()  # the official code copies the encoder
        self.temperature = temperature
        text_config = model.vlm.config.get_text_config()
        pad = getattr(model.vlm.generation_config, "pad_token_id", None)
        self.pad = pad if pad is not None else (text_config.pad_token_id or 0)

    def head_features(self, pixel_values, image_grid_thw):
        output = self.encoder(pixel_values, grid_thw=image_grid_thw)
        tokens = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(tokens, (tuple, list)):
            tokens = tokens[0]
        return tokens.mean(0, keepdim=True)  # the whole batch as one image: right only at batch size 1

    def head_probs(self, inputs):
        return self.model.forward_head(self.head_features(inputs["pixel_values"], inputs["image_grid_thw"])).softmax(-1)

    def vlm_vector(self, inputs, new_tokens):
        generated = self.model.vlm.generate(
            **inputs,
            do_sample=True,
            temperature=self.temperature,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            pad_token_id=self.pad,
        )
        vectors, _, _ = self.model.answers_to_vectors(generated[:, inputs["input_ids"].shape[1] :])
        return vectors

    def predict(self, inputs, new_tokens):
        probs = self.head_probs(inputs)
        return self.model.forward_gate(self.vlm_vector(inputs, new_tokens), probs)


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OtherLoad:
    """Share of the machine's CPU time that other processes used between two calls of `sample()` (Linux
    /proc/stat minus this process's own CPU time); None where that cannot be read."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self):
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self.tick  # all CPUs, seconds; minus idle and iowait
        own = sum(os.times()[:2])
        return time.perf_counter(), busy, own

    def sample(self):
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        others = (now[1] - last[1]) - (now[2] - last[2]) - 2.0 / self.tick  # two ticks of rounding slack
        return max(0.0, others / ((now[0] - last[0]) * self.cpus))


def interleaved_medians(functions, runs, warmup, device, max_other_load=0.1, max_rounds=None):
    """({name: [ms per kept round]}, round info): each round calls every function once, in order, after `warmup`
    untimed rounds. A round during which other processes used more than `max_other_load` of the machine's CPU time is
    set aside and repeated, up to `max_rounds` rounds in all (default 3 x runs); if too few quiet rounds come, the
    busiest rounds are dropped last (the quietest `runs` rounds are kept)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    max_rounds = max_rounds or 3 * runs
    load = OtherLoad()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection pauses inside timed calls
    try:
        rounds = _timed_rounds(functions, runs, device, max_other_load, max_rounds, load)
    finally:
        if gc_was_enabled:
            gc.enable()
    quiet = [r for r in rounds if r[0] is None or r[0] <= max_other_load]
    kept = quiet[:runs] if len(quiet) >= runs else sorted(rounds, key=lambda r: r[0] or 0.0)[:runs]
    info = {
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "max_other_load": max_other_load,
        "other_load_per_round": [None if r[0] is None else round(r[0], 3) for r in rounds],
        "all_rounds_quiet": len(quiet) >= runs,
    }
    return {name: [r[1][name] for r in kept] for name in functions}, info


def _timed_rounds(functions, runs, device, max_other_load, max_rounds, load):
    rounds = []
    while len(rounds) < max_rounds:
        load.sample()
        times = {}
        for name, function in functions.items():
            _sync(device)
            start = time.perf_counter()
            function()
            _sync(device)
            times[name] = (time.perf_counter() - start) * 1000.0
        other = load.sample()
        rounds.append((other, times))
        if sum(1 for r in rounds if r[0] is None or r[0] <= max_other_load) >= runs:
            break
    return rounds


def _read_status_kb(field):
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return _read_status_kb("VmHWM") is not None
    except OSError:
        return False


class MemoryMeter:
    def __init__(self, device):
        import torch

        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.method = "peak resident set size of the process (VmHWM, reset per call via /proc/self/clear_refs)"
        else:
            self.method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process, never reset)"
        self._torch = torch

    def measure(self, function):
        """(peak_mb, peak_minus_before_mb) for one call."""
        torch = self._torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            function()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return round(peak / 2**20, 1), round((peak - before) / 2**20, 1)
        if self.method.startswith("peak resident"):
            _reset_peak_rss()
            before = _read_status_kb("VmRSS")
            function()
            peak = _read_status_kb("VmHWM")
            return round(peak / 1024, 1), round((peak - before) / 1024, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        function()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / 1024, 1), round((peak - before) / 1024, 1)


def _bytes_mb(*modules):
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return round(total / 2**20, 1)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def param_counts(model):
    backbone, head, gate = _count(model.vlm), _count(model.distill_head), _count(model.gate)
    total = backbone + head + gate
    return {
        "backbone": backbone,
        "visual_encoder": _count(model.vlm.model.visual),
        "head": head,
        "gate": gate,
        "total": total,
        "head_gate_share": (head + gate) / total,
    }


def qwen2_vl_7b_param_counts(num_labels=8, head_hidden_sizes=PAPER_HEAD_HIDDEN, gate_type="concat_linear"):
    """Parameter counts at Qwen2-VL-7B's real size: the backbone instantiated on the `meta` device from its config."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from configuration_emovlm_kd import EmoVLMKDConfig
    from modeling_emovlm_kd import EmoVLMKDDistillationHead, build_gate

    config = Qwen2VLConfig(**copy.deepcopy(QWEN2_VL_7B))
    with torch.device("meta"):
        vlm = Qwen2VLForConditionalGeneration(config)
    labels = [str(i) for i in range(num_labels)]
    emo_config = EmoVLMKDConfig(
        vlm_config=config, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        gate_type=gate_type,
    )
    head = EmoVLMKDDistillationHead(config.text_config.hidden_size, head_hidden_sizes, num_labels, 0.1)
    gate = build_gate(emo_config)
    backbone, head_n, gate_n = _count(vlm), _count(head), _count(gate)
    total = backbone + head_n + gate_n
    return {
        "backbone": backbone,
        "visual_encoder": _count(vlm.model.visual),
        "head": head_n,
        "gate": gate_n,
        "total": total,
        "head_gate_share": (head_n + gate_n) / total,
    }


def _visual_encoder_count(*modules):
    from torch import nn

    kinds = {type(m.vlm.model.visual) for m in modules if hasattr(m, "vlm")}
    seen = set()
    for module in modules:
        for sub in module.modules() if isinstance(module, nn.Module) else ():
            if type(sub) in kinds:
                seen.add(id(sub))
    return len(seen)


# ----------------------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------------------


def _kd_loss(student_logits, teacher_logits, labels, alpha=0.5, tau=2.0):
    import torch.nn.functional as F

    student = F.log_softmax(student_logits.float() / tau, -1)
    kl = F.kl_div(student, F.softmax(teacher_logits.float() / tau, -1), reduction="batchmean")
    return alpha * tau * tau * kl + (1 - alpha) * F.cross_entropy(student_logits.float(), labels)


def _minibatch_epochs(module, inputs_fn, loss_fn, count, epochs, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-4)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, STAGE_MINIBATCH):
            index = order[start : start + STAGE_MINIBATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module, *inputs_fn(index)).backward()
            optimizer.step()


def distill_stage(model, reference, batches, singles, teacher, labels, epochs, seed=0):
    """Seconds: (ours, reference). Ours caches the pooled features in one batched pass; the reference reruns its
    encoder copy for every image in every epoch at batch size 1."""
    import torch

    device = model.device
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        features = torch.cat(
            [
                model.pool_image_features(model.encode_images(b["pixel_values"], b["image_grid_thw"]).pooler_output)
                for b in batches
            ]
        )
    head = copy.deepcopy(model.distill_head)
    _minibatch_epochs(
        head,
        lambda index: (features[index.to(device)], teacher[index.to(device)], labels[index.to(device)]),
        lambda module, x, t, y: _kd_loss(module(x.to(module.classifier.weight.dtype)), t, y),
        len(labels),
        epochs,
        seed,
    )
    _sync(device)
    ours = time.perf_counter() - start

    head = copy.deepcopy(model.distill_head).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for i, single in enumerate(singles):
            with torch.no_grad():
                feature = reference.head_features(single["pixel_values"], single["image_grid_thw"])
            optimizer.zero_grad(set_to_none=True)
            logits = head(feature.to(head.classifier.weight.dtype))
            _kd_loss(logits, teacher[i : i + 1], labels[i : i + 1]).backward()
            optimizer.step()
    _sync(device)
    return ours, time.perf_counter() - start


def gate_stage(model, reference, batches, singles, labels, new_tokens, epochs, reference_epochs, seed=0):
    """Seconds: (ours, reference measured, reference scaled to `epochs`). Ours runs the model once over all images
    (score mode, batched) and trains the gate on the cached vectors; the reference regenerates every answer (and
    reruns its encoder copy for the head) in every epoch at batch size 1."""
    import torch
    import torch.nn.functional as F

    device = model.device
    _sync(device)
    start = time.perf_counter()
    vlm_vectors, head_probs = [], []
    with torch.no_grad():
        for b in batches:
            output = model(**b, vlm_mode="score")
            vlm_vectors.append(output.vlm_scores)
            head_probs.append(output.distill_logits.softmax(-1))
    vlm_vectors, head_probs = torch.cat(vlm_vectors), torch.cat(head_probs)
    gate = copy.deepcopy(model.gate)
    dtype = model.distill_head.classifier.weight.dtype
    _minibatch_epochs(
        gate,
        lambda index: (vlm_vectors[index.to(device)], head_probs[index.to(device)], labels[index.to(device)]),
        lambda module, v, p, y: F.cross_entropy(module(v.to(dtype), p.to(dtype)).float(), y),
        len(labels),
        epochs,
        seed,
    )
    _sync(device)
    ours = time.perf_counter() - start

    gate = copy.deepcopy(model.gate).train()
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-3, weight_decay=1e-4)
    torch.manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reference_epochs):
        for i, single in enumerate(singles):
            with torch.no_grad():
                probs = reference.head_probs(single)
                vector = reference.vlm_vector(single, new_tokens[i])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(gate(vector.to(dtype), probs.to(dtype)).float(), labels[i : i + 1]).backward()
            optimizer.step()
    _sync(device)
    measured = time.perf_counter() - start
    return ours, measured, measured * epochs / reference_epochs


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def _median(values):
    return round(statistics.median(values), 3)


def _evaluate_targets(report):
    values = {
        "predict_vs_reference": report["predict_vs_reference"],
        "predict_vs_lower_bound": report["predict_vs_lower_bound"],
        "gate_stage_speedup": report.get("gate_stage_speedup"),
        "distill_stage_speedup": report.get("distill_stage_speedup"),
        "batched_per_image_vs_batch_1": report["batched_per_image_vs_batch_1"],
        "visual_encoders": report["visual_encoders"]["ours"],
        "head_gate_share_7b": report["params_qwen2_vl_7b"]["head_gate_share"],
    }
    checks = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t, "==": lambda v, t: v == t}
    out = {}
    for name, (op, target) in TARGETS.items():
        value = values[name]
        out[name] = {
            "value": value,
            "target": f"{op} {target}",
            "met": None if value is None else bool(checks[op](value, target)),
        }
    return out


def run_benchmark(settings, config="small", model_name=None, device=None, dtype=None, threads=1, seed=0,
                  skip_stages=False, progress=None):
    """Run every measurement; return the report (a JSON-ready dict)."""
    import torch

    say = progress or (lambda message: logger.info(message))
    device = torch.device(device or "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype is None:
        dtype = torch.bfloat16 if (model_name and device.type == "cuda") else torch.float32
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_benchmark(settings, config, model_name, device, dtype, threads, seed, skip_stages, say)
    finally:
        torch.set_num_threads(previous_threads)


def _run_benchmark(settings, config, model_name, device, dtype, threads, seed, skip_stages, say):
    import torch
    import transformers

    say(f"building the model ({model_name or config})")
    if model_name:
        model, processor = load_model(model_name, dtype=dtype)
    else:
        model, processor = build_random_model(config, seed=seed, image_size=settings["image_size"])
    model.to(device=device, dtype=dtype).eval()
    model.attach_tokenizer(processor.tokenizer)
    batch_sizes = settings["batch_sizes"]
    side = settings["image_size"]
    largest = max(batch_sizes)
    images = random_images(largest, side, seed=seed)
    batched = {b: make_inputs(model, processor, images[:b]) for b in batch_sizes}
    single = make_inputs(model, processor, images[:1])
    answer_lengths = [len(a) for a in model.config.label_answer_token_ids]
    new_tokens = answer_lengths[0]  # the first image's "true" label is label 0
    inference = torch.inference_mode

    # -- checks: fast paths against slow ones --------------------------------------------------------------------
    say("checking the fast score path against brute force and batch against single")
    check_inputs = batched[largest] if largest > 1 else single
    with inference():
        fast = model(**single).vlm_log_likelihoods.float().cpu()
        batch_out = model(**check_inputs)
        single_outs = [model(**row) for row in split_inputs(check_inputs)]
    slow = brute_force_log_likelihoods(model, single)
    batch_logits = batch_out.logits.float().cpu()
    single_logits = torch.cat([o.logits.float().cpu() for o in single_outs])
    batch_ll = batch_out.vlm_log_likelihoods.float().cpu()
    single_ll = torch.cat([o.vlm_log_likelihoods.float().cpu() for o in single_outs])
    checks = {
        "score_vs_brute_force_max_abs_diff": float((fast - slow).abs().max()),
        "score_vs_brute_force_same_ranking": bool(torch.equal(fast.argsort(-1), slow.argsort(-1))),
        "batch_vs_single_logits_max_abs_diff": float((batch_logits - single_logits).abs().max()),
        "batch_vs_single_log_likelihood_max_abs_diff": float((batch_ll - single_ll).abs().max()),
        "batch_vs_single_same_answers": bool(torch.equal(batch_logits.argmax(-1), single_logits.argmax(-1))),
        "batch_size_checked": int(check_inputs["input_ids"].shape[0]),
    }

    # -- memory (ours and the floor before the reference's encoder copy exists) -------------------------------
    def predict(inputs):
        return model(**inputs)

    def lower_bound(inputs):
        image_outputs = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        return model.vlm(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            mm_encoder_outputs={"image": image_outputs},
            use_cache=False,
            logits_to_keep=1,
        ).logits

    meter = MemoryMeter(device)
    memory = {"method": meter.method}
    with inference():
        predict(single)
        lower_bound(single)
        memory["predict"] = dict(zip(("peak_mb", "above_before_mb"), meter.measure(lambda: predict(single))))
        memory["lower_bound"] = dict(zip(("peak_mb", "above_before_mb"), meter.measure(lambda: lower_bound(single))))
        for b in batch_sizes:
            memory[f"predict_batch_{b}"] = dict(
                zip(("peak_mb", "above_before_mb"), meter.measure(lambda: predict(batched[b])))
            )
    reference = ReferenceProtocol(model)
    with inference():
        torch.manual_seed(seed)
        reference.predict(single, new_tokens)
        memory["reference"] = dict(
            zip(("peak_mb", "above_before_mb"), meter.measure(lambda: reference.predict(single, new_tokens)))
        )
    memory["weights_mb"] = {"ours": _bytes_mb(model), "reference": _bytes_mb(model, reference.encoder)}

    # -- inference timings, interleaved -------------------------------------------------------------------------
    say(f"timing inference: {settings['warmup']} warm-up + {settings['runs']} rounds")
    torch.manual_seed(seed)
    functions = {
        "predict": lambda: predict(single),
        "reference": lambda: reference.predict(single, new_tokens),
        "lower_bound": lambda: lower_bound(single),
        "encoder": lambda: model.encode_images(single["pixel_values"], single["image_grid_thw"]),
    }
    for b in batch_sizes:
        if b > 1:
            functions[f"batch_{b}"] = lambda b=b: predict(batched[b])
    with inference():
        times, rounds = interleaved_medians(
            functions, settings["runs"], settings["warmup"], device, max_other_load=settings["max_other_load"]
        )
    medians = {name: _median(values) for name, values in times.items()}
    per_image = {str(b): (medians["predict"] if b == 1 else round(medians[f"batch_{b}"] / b, 3)) for b in batch_sizes}

    report = {
        "config": None if model_name else config,
        "model": model_name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "runs": settings["runs"],
        "warmup_rounds": settings["warmup"],
        "timing": "milliseconds, median over interleaved rounds (each round: ours, the reference, the floor, ...); "
        "rounds during which other processes used more than max_other_load of the CPUs are repeated",
        "rounds": rounds,
        "image_size": [side, side],
        "image_tokens": int(single["image_grid_thw"].prod(-1).item() // model.spatial_merge_size**2),
        "prompt_tokens": int(single["input_ids"].shape[1]),
        "labels": model.config.labels,
        "answer_tokens": answer_lengths,
        "reference_new_tokens": new_tokens,
        "predict_ms": medians["predict"],
        "reference_ms": medians["reference"],
        "lower_bound_ms": medians["lower_bound"],
        "encoder_ms": medians["encoder"],
        "per_image_ms": per_image,
        "runs_ms": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "predict_vs_reference": round(medians["predict"] / medians["reference"], 4),
        "predict_vs_lower_bound": round(medians["predict"] / medians["lower_bound"], 4),
        "lower_bound_vs_reference": round(medians["lower_bound"] / medians["reference"], 4),
        "batched_per_image_vs_batch_1": round(per_image[str(largest)] / per_image[str(min(batch_sizes))], 4)
        if largest > min(batch_sizes)
        else None,
    }

    # -- training stages ---------------------------------------------------------------------------------------------
    if not skip_stages:
        count = settings["stage_images"]
        say(f"timing the stages on {count} images")
        stage_images = random_images(count, side, seed=seed + 1)
        stage_batch = max(batch_sizes)
        stage_batches = [
            make_inputs(model, processor, stage_images[i : i + stage_batch]) for i in range(0, count, stage_batch)
        ]
        stage_singles = [make_inputs(model, processor, [image]) for image in stage_images]
        num_labels = len(model.config.labels)
        labels = torch.arange(count, device=device) % num_labels
        generator = torch.Generator().manual_seed(seed)
        teacher = torch.randn(count, num_labels, generator=generator).to(device)
        lengths = [answer_lengths[int(y)] for y in labels.tolist()]
        load = OtherLoad()
        d_ours, d_ref = distill_stage(
            model, reference, stage_batches, stage_singles, teacher, labels, settings["distill_epochs"], seed
        )
        d_load = load.sample()
        say("distillation stage done; gate stage (the reference regenerates answers every epoch)")
        g_ours, g_measured, g_ref = gate_stage(
            model, reference, stage_batches, stage_singles, labels, lengths, settings["gate_epochs"],
            settings["reference_gate_epochs"], seed,
        )
        g_load = load.sample()
        report["distill_stage"] = {
            "images": count,
            "epochs": settings["distill_epochs"],
            "ours_s": round(d_ours, 3),
            "reference_s": round(d_ref, 3),
            "reference_epochs_measured": settings["distill_epochs"],
            "ours_batch_size": stage_batch,
            "minibatch": STAGE_MINIBATCH,
            "other_load": None if d_load is None else round(d_load, 3),
        }
        report["gate_stage"] = {
            "images": count,
            "epochs": settings["gate_epochs"],
            "ours_s": round(g_ours, 3),
            "reference_s": round(g_ref, 3),
            "reference_measured_s": round(g_measured, 3),
            "reference_epochs_measured": settings["reference_gate_epochs"],
            "reference_extrapolated": settings["reference_gate_epochs"] < settings["gate_epochs"],
            "ours_batch_size": stage_batch,
            "minibatch": STAGE_MINIBATCH,
            "other_load": None if g_load is None else round(g_load, 3),
        }
        report["distill_stage_speedup"] = round(d_ref / d_ours, 3)
        report["gate_stage_speedup"] = round(g_ref / g_ours, 3)
    else:
        report["distill_stage_speedup"] = report["gate_stage_speedup"] = None

    report["memory"] = memory
    report["params"] = param_counts(model)
    report["params_qwen2_vl_7b"] = qwen2_vl_7b_param_counts(len(model.config.labels))
    report["visual_encoders"] = {"ours": _visual_encoder_count(model), "reference": _visual_encoder_count(model) + 1}
    report["checks"] = checks
    report["targets"] = _evaluate_targets(report)
    report["targets_apply"] = bool(config == "small" and not model_name and device.type == "cpu")
    report["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "attn_implementation": model.vlm.config._attn_implementation,
        "modeling_file": getattr(sys.modules.get(type(model).__module__), "__file__", None),
    }
    return report


def format_table(report):
    """A plain-text table of the main figures."""
    rows = [
        ("model", report["model"] or f"random {report['config']}"),
        ("device / dtype / threads", f"{report['device']} / {report['dtype']} / {report['threads']}"),
        ("prompt tokens (image tokens)", f"{report['prompt_tokens']} ({report['image_tokens']})"),
        ("predict, batch 1 (ms)", report["predict_ms"]),
        ("reference: paper's protocol (ms)", report["reference_ms"]),
        ("lower bound: encoder + prefill (ms)", report["lower_bound_ms"]),
        ("  of which encoder (ms)", report["encoder_ms"]),
    ]
    rows += [(f"per image at batch {b} (ms)", v) for b, v in report["per_image_ms"].items()]
    rows += [
        ("predict / reference", report["predict_vs_reference"]),
        ("predict / lower bound", report["predict_vs_lower_bound"]),
        ("lower bound / reference", report["lower_bound_vs_reference"]),
    ]
    for stage in ("distill_stage", "gate_stage"):
        if stage in report:
            s = report[stage]
            measured = s["reference_epochs_measured"]
            note = "" if measured == s["epochs"] else f", {measured} measured"
            rows.append(
                (f"{stage.replace('_', ' ')}: {s['epochs']} epochs, {s['images']} images (s)",
                 f"ours {s['ours_s']} vs reference {s['reference_s']}{note}")
            )
            rows.append((f"{stage.replace('_', ' ')} speedup", report[f"{stage}_speedup"]))
    mem = report["memory"]
    rows.append(("peak memory predict / reference (MB)",
                 f"{mem['predict']['peak_mb']} / {mem['reference']['peak_mb']}"))
    rows.append(("weights ours / reference (MB)", f"{mem['weights_mb']['ours']} / {mem['weights_mb']['reference']}"))
    p, p7 = report["params"], report["params_qwen2_vl_7b"]
    rows.append(("params backbone / head / gate", f"{p['backbone']:,} / {p['head']:,} / {p['gate']:,}"))
    rows.append(("head + gate share (this model)", f"{100 * p['head_gate_share']:.3f}%"))
    rows.append(("head + gate share (Qwen2-VL-7B)", f"{100 * p7['head_gate_share']:.4f}% of {p7['total']:,}"))
    encoders = report["visual_encoders"]
    rows.append(("visual encoders ours / reference", f"{encoders['ours']} / {encoders['reference']}"))
    c = report["checks"]
    rows.append(("check: score vs brute force (max |diff|)", f"{c['score_vs_brute_force_max_abs_diff']:.2e}"))
    rows.append(("check: batch vs single (max |diff| logits)", f"{c['batch_vs_single_logits_max_abs_diff']:.2e}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("")
    title = "targets (issue: CPU, small config)" + ("" if report["targets_apply"] else " - for information only here")
    lines.append(title)
    for name, t in report["targets"].items():
        value = t["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else value
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        lines.append(f"  {name.ljust(width - 2)}  {shown} {t['target']}: {mark}")
    return "\n".join(lines)


def run(args):
    settings = _check_args(args)
    if args.device and args.device.startswith("cuda"):
        import torch

        from emovlm_kd.errors import UsageError

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available")

    def progress(message):
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = run_benchmark(
        settings,
        config=args.config,
        model_name=args.model,
        device=args.device,
        dtype=args.dtype,
        threads=settings["threads"],
        seed=args.seed,
        skip_stages=args.skip_stages,
        progress=progress,
    )
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(report))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, allow_nan=False, default=_json_default)
            handle.write("\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
