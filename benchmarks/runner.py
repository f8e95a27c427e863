"""The benchmark's steps, in order: build the model and its inputs, check the fast paths against slow ones, measure
memory, time inference (ours, the reference, the floor, interleaved round by round), time the training stages, count
parameters; `run_benchmark` returns the JSON-ready report."""

import logging
import os
import platform
import sys
from dataclasses import dataclass

import torch
import transformers

from emovlm_kd.runtime import resolve_dtype
from scoring_emovlm_kd import PromptPrefixCache

from .meters import MemoryMeter, interleaved_medians, median_ms
from .models import (
    CONFIGS,
    REAL_SIZES,
    brute_force_log_likelihoods,
    build_random_model,
    load_model,
    make_inputs,
    param_counts,
    qwen2_vl_7b_param_counts,
    real_size_param_counts,
    random_images,
    split_inputs,
    visual_encoder_count,
    weights_mb,
)
from .reference import ReferenceProtocol, lower_bound
from .report import evaluate_targets, targets_apply
from .stages import time_stage1, time_stages

logger = logging.getLogger(__name__)


@dataclass
class Workload:
    """The model under test and its preprocessed inputs (preprocessing is timed for no protocol)."""

    model: torch.nn.Module
    processor: object
    single: dict  # one image, batch 1
    batched: dict  # batch size -> inputs of that many images
    answer_lengths: list  # tokens of each label's answer
    prompt_cache: PromptPrefixCache  # the backbone stays frozen for the whole run, as in `predict` and the pipeline

    @property
    def new_tokens(self):
        return self.answer_lengths[0]  # the first image's "true" label is label 0

    def predict(self, inputs):
        """Our inference (score mode); under torch.inference_mode(), as the prompt cache requires."""
        return self.model(**inputs, prompt_cache=self.prompt_cache)


def run_benchmark(args):
    """Run every measurement with `args` (a resolved `BenchArguments`); return the report (a JSON-ready dict)."""
    device = torch.device(args.device or "cpu")
    dtype = resolve_dtype(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if (args.model and device.type == "cuda") else torch.float32
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, dtype)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, device, dtype):
    work = prepare(args, device, dtype)
    checks = check_fast_paths(work)
    memory = measure_memory_ours(work)  # before the reference's encoder copy exists
    reference = ReferenceProtocol(work.model, tokenizer=work.processor.tokenizer)
    memory.update(measure_memory_reference(work, reference, args.seed))
    times, rounds = time_inference(work, reference, args)
    report = describe_run(args, work, device, dtype, rounds)
    report.update(inference_figures(work, times))
    if args.skip_stages:
        report["distill_stage_speedup"] = report["gate_stage_speedup"] = None
    else:
        report.update(time_stages(work.model, work.processor, reference, args))
    report["memory"] = memory
    report.update(model_sizes(work.model))
    report["checks"] = checks
    report["targets"] = evaluate_targets(report)
    report["targets_apply"] = targets_apply(report)
    report["environment"] = environment(work.model, device)
    return report


def run_train_benchmark(args):
    """`--train`: stage 1's QLoRA steps per second and peak memory (`stages.time_stage1`); the JSON-ready report."""
    device = torch.device(args.device or "cpu")
    dtype = resolve_dtype(args.dtype) or torch.float32
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = {"config": args.config, "backbone": args.backbone, "device": str(device),
                  "dtype": str(dtype).replace("torch.", ""),
                  "threads": args.threads, "stage1": time_stage1(args, device, dtype)}
    finally:
        torch.set_num_threads(previous_threads)
    report["environment"] = environment(None, device)
    return report


def prepare(args, device, dtype):
    """The model on `device` in `dtype`, and the inputs of every batch size."""
    logger.info("building the model (%s)", args.model or args.config)
    if args.model:
        model, processor = load_model(args.model, dtype=dtype)
    elif CONFIGS[args.config]["device"]:  # 7b: built directly on the device in its dtype
        model, processor = build_random_model(args.config, seed=args.seed, image_size=args.image_size,
                                              device=device, dtype=dtype, backbone=args.backbone)
    else:
        model, processor = build_random_model(args.config, seed=args.seed, image_size=args.image_size,
                                              backbone=args.backbone)
    model.to(device=device, dtype=dtype).eval()
    images = random_images(max(args.sizes), args.image_size, seed=args.seed)
    return Workload(
        model=model,
        processor=processor,
        single=make_inputs(model, processor, images[:1]),
        batched={b: make_inputs(model, processor, images[:b]) for b in args.sizes},
        answer_lengths=[len(a) for a in model.config.label_answer_token_ids],
        prompt_cache=PromptPrefixCache(),
    )


def check_fast_paths(work):
    """The fast score path against brute force, and the largest batch against its rows one at a time."""
    logger.info("checking the fast score path against brute force and batch against single")
    model, single = work.model, work.single
    batch = work.batched[max(work.batched)] if max(work.batched) > 1 else single
    with torch.inference_mode():
        fast = work.predict(single).vlm_log_likelihoods.float().cpu()
        batch_out = work.predict(batch)
        single_outs = [work.predict(row) for row in split_inputs(batch)]
    slow = brute_force_log_likelihoods(model, single)
    batch_logits = batch_out.logits.float().cpu()
    single_logits = torch.cat([o.logits.float().cpu() for o in single_outs])
    batch_ll = batch_out.vlm_log_likelihoods.float().cpu()
    single_ll = torch.cat([o.vlm_log_likelihoods.float().cpu() for o in single_outs])
    return {
        "score_vs_brute_force_max_abs_diff": float((fast - slow).abs().max()),
        "score_vs_brute_force_same_ranking": bool(torch.equal(fast.argsort(-1), slow.argsort(-1))),
        "batch_vs_single_logits_max_abs_diff": float((batch_logits - single_logits).abs().max()),
        "batch_vs_single_log_likelihood_max_abs_diff": float((batch_ll - single_ll).abs().max()),
        "batch_vs_single_same_answers": bool(torch.equal(batch_logits.argmax(-1), single_logits.argmax(-1))),
        "batch_size_checked": int(batch["input_ids"].shape[0]),
    }


@torch.inference_mode()
def measure_memory_ours(work):
    """Peak memory of one call of ours (batch 1 and every batch size) and of the floor, after one warm-up call."""
    meter = MemoryMeter(work.model.device)
    work.predict(work.single)
    lower_bound(work.model, work.single)
    memory = {
        "method": meter.method,
        "predict": meter.measure(lambda: work.predict(work.single)),
        "lower_bound": meter.measure(lambda: lower_bound(work.model, work.single)),
    }
    for b, inputs in work.batched.items():
        memory[f"predict_batch_{b}"] = meter.measure(lambda inputs=inputs: work.predict(inputs))
    return memory


@torch.inference_mode()
def measure_memory_reference(work, reference, seed):
    """Peak memory of one call of the reference, and the weights each protocol holds."""
    meter = MemoryMeter(work.model.device)
    torch.manual_seed(seed)
    reference.predict(work.single, work.new_tokens)
    return {
        "reference": meter.measure(lambda: reference.predict(work.single, work.new_tokens)),
        "weights_mb": {"ours": weights_mb(work.model), "reference": weights_mb(work.model, reference.encoder)},
    }


def time_inference(work, reference, args):
    """({name: [ms per round]}, round info): ours, the reference, the floor, the encoder alone, ours batched."""
    logger.info("timing inference: %d warm-up + %d rounds", args.warmup, args.runs)
    model, single = work.model, work.single
    torch.manual_seed(args.seed)
    functions = {
        "predict": lambda: work.predict(single),
        "reference": lambda: reference.predict(single, work.new_tokens),
        "lower_bound": lambda: lower_bound(model, single),
        "encoder": lambda: model.encode_images(single["pixel_values"], single["image_grid_thw"]),
    }
    for b, inputs in work.batched.items():
        if b > 1:
            functions[f"batch_{b}"] = lambda inputs=inputs: work.predict(inputs)
    with torch.inference_mode():
        return interleaved_medians(functions, args.runs, args.warmup, model.device, args.max_other_load)


def describe_run(args, work, device, dtype, rounds):
    """What was measured, and how."""
    single = work.single
    return {
        "config": None if args.model else args.config,
        "backbone": work.model.config.vlm_config.model_type,
        "model": args.model,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": args.threads,
        "runs": args.runs,
        "warmup_rounds": args.warmup,
        "timing": "milliseconds, median over interleaved rounds (each round: ours, the reference, the floor, ...); "
        "rounds during which other processes used more than max_other_load of the CPUs are repeated",
        "rounds": rounds,
        "image_size": [args.image_size, args.image_size],
        "image_tokens": int(single["image_grid_thw"].prod(-1).item() // work.model.spatial_merge_size**2),
        "prompt_tokens": int(single["input_ids"].shape[1]),
        "labels": work.model.config.labels,
        "answer_tokens": work.answer_lengths,
        "reference_new_tokens": work.new_tokens,
    }


def inference_figures(work, times):
    """Medians, per-image times at each batch size, every round, and the ratios."""
    medians = {name: median_ms(values) for name, values in times.items()}
    sizes = sorted(work.batched)
    per_image = {str(b): medians["predict"] if b == 1 else round(medians[f"batch_{b}"] / b, 3) for b in sizes}
    largest, smallest = max(sizes), min(sizes)
    return {
        "predict_ms": medians["predict"],
        "reference_ms": medians["reference"],
        "lower_bound_ms": medians["lower_bound"],
        "encoder_ms": medians["encoder"],
        "per_image_ms": per_image,
        "runs_ms": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "predict_vs_reference": round(medians["predict"] / medians["reference"], 4),
        "predict_vs_lower_bound": round(medians["predict"] / medians["lower_bound"], 4),
        "lower_bound_vs_reference": round(medians["lower_bound"] / medians["reference"], 4),
        "batched_per_image_vs_batch_1": round(per_image[str(largest)] / per_image[str(smallest)], 4)
        if largest > smallest
        else None,
    }


def model_sizes(model):
    """Parameter counts of this model, at Qwen2-VL-7B's size and at its own backbone's real size (Qwen2.5-VL-7B,
    Qwen3-VL-8B), and the visual encoders each protocol holds."""
    encoders = visual_encoder_count(model)
    backbone = model.config.vlm_config.model_type
    real = {"model": REAL_SIZES[backbone][0], **real_size_param_counts(backbone, len(model.config.labels))} \
        if backbone in REAL_SIZES else None
    return {
        "params": param_counts(model),
        "params_qwen2_vl_7b": qwen2_vl_7b_param_counts(len(model.config.labels)),
        "params_real_size": real,
        "visual_encoders": {"ours": encoders, "reference": encoders + 1},
    }


def environment(model, device):
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "attn_implementation": model.vlm.config._attn_implementation if model is not None else None,
        "modeling_file": getattr(sys.modules.get(type(model).__module__), "__file__", None) if model is not None
        else None,
    }
