"""The report's targets (the issue's: set for the CPU and the `small` config, and for a GPU and the `7b` config), the
plain-text table printed at the end of a run, and the JSON file."""

import json
import math

TARGETS = {  # the targets (CPU, small config)
    "predict_vs_reference": ("<=", 0.5),
    "predict_vs_lower_bound": ("<=", 1.15),
    "gate_stage_speedup": (">=", 8.0),
    "distill_stage_speedup": (">=", 4.0),
    "batched_per_image_vs_batch_1": ("<", 1.0),
    "visual_encoders": ("==", 1),
    "head_gate_share_7b": ("<=", 0.005),
}

TARGETS_7B_GPU = {  # the GPU targets (H200, bfloat16, --config 7b, 448 x 448)
    "predict_ms": ("<=", 25.0),
    "per_image_ms_batch_32": ("<=", 10.0),
    "visual_encoders": ("==", 1),
    "head_gate_share_7b": ("<=", 0.005),
}

_CHECKS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t, "==": lambda v, t: v == t}


def target_set(report):
    """(title, targets) of the run: the GPU targets for the `7b` config, else the CPU ones (set for `small`)."""
    if report.get("config") == "7b":
        return "issue: GPU, 7b config", TARGETS_7B_GPU
    return "issue: CPU, small config", TARGETS


def targets_apply(report):
    """Whether the run is the one its targets are set for: `small` on the CPU, or `7b` on CUDA (random weights)."""
    if report.get("model"):
        return False
    on_cuda = report["device"].startswith("cuda")
    return (report["config"] == "small" and not on_cuda) or (report["config"] == "7b" and on_cuda)


def evaluate_targets(report):
    """{target: {"value", "target", "met"}}; `met` is None where the value was not measured."""
    values = {
        "predict_vs_reference": report["predict_vs_reference"],
        "predict_vs_lower_bound": report["predict_vs_lower_bound"],
        "gate_stage_speedup": report.get("gate_stage_speedup"),
        "distill_stage_speedup": report.get("distill_stage_speedup"),
        "batched_per_image_vs_batch_1": report["batched_per_image_vs_batch_1"],
        "visual_encoders": report["visual_encoders"]["ours"],
        "head_gate_share_7b": report["params_qwen2_vl_7b"]["head_gate_share"],
        "predict_ms": report["predict_ms"],
        "per_image_ms_batch_32": report["per_image_ms"].get("32"),
    }
    out = {}
    for name, (op, target) in target_set(report)[1].items():
        value = values[name]
        out[name] = {
            "value": value,
            "target": f"{op} {target}",
            "met": None if value is None else bool(_CHECKS[op](value, target)),
        }
    return out


def _inference_rows(report):
    rows = [
        ("model", report["model"] or f"random {report['config']} ({report.get('backbone', 'qwen2_vl')})"),
        ("device / dtype / threads", f"{report['device']} / {report['dtype']} / {report['threads']}"),
        ("prompt tokens (image tokens)", f"{report['prompt_tokens']} ({report['image_tokens']})"),
        ("predict, batch 1 (ms)", report["predict_ms"]),
        ("reference: paper's protocol (ms)", report["reference_ms"]),
        ("lower bound: encoder + prefill (ms)", report["lower_bound_ms"]),
        ("  of which encoder (ms)", report["encoder_ms"]),
    ]
    rows += [(f"per image at batch {b} (ms)", v) for b, v in report["per_image_ms"].items()]
    return rows + [
        ("predict / reference", report["predict_vs_reference"]),
        ("predict / lower bound", report["predict_vs_lower_bound"]),
        ("lower bound / reference", report["lower_bound_vs_reference"]),
    ]


def _stage_rows(report):
    rows = []
    for stage in ("distill_stage", "gate_stage"):
        if stage in report:
            s = report[stage]
            measured = s["reference_epochs_measured"]
            note = "" if measured == s["epochs"] else f", {measured} measured"
            name = stage.replace("_", " ")
            rows.append((f"{name}: {s['epochs']} epochs, {s['images']} images (s)",
                         f"ours {s['ours_s']} vs reference {s['reference_s']}{note}"))
            rows.append(("  ours: caching pass / training (s)", f"{s['ours_cache_s']} / {s['ours_train_s']}"))
            rows.append((f"{name} speedup", report[f"{stage}_speedup"]))
    return rows


def _size_rows(report):
    mem, p, p7 = report["memory"], report["params"], report["params_qwen2_vl_7b"]
    encoders, c = report["visual_encoders"], report["checks"]
    batched = [(f"  peak memory at batch {k.rsplit('_', 1)[1]} (MB)", v["peak_mb"]) for k, v in mem.items()
               if k.startswith("predict_batch_")]
    return [
        ("peak memory predict / reference / floor (MB)",
         f"{mem['predict']['peak_mb']} / {mem['reference']['peak_mb']} / {mem['lower_bound']['peak_mb']}"),
        *batched,
        ("weights ours / reference (MB)", f"{mem['weights_mb']['ours']} / {mem['weights_mb']['reference']}"),
        ("params backbone / head / gate", f"{p['backbone']:,} / {p['head']:,} / {p['gate']:,}"),
        ("head + gate share (this model)", f"{100 * p['head_gate_share']:.3f}%"),
        ("head + gate share (Qwen2-VL-7B)", f"{100 * p7['head_gate_share']:.4f}% of {p7['total']:,}"),
        *[(f"head + gate share ({real['model'].split('/')[-1]})",
           f"{100 * real['head_gate_share']:.4f}% of {real['total']:,}")
          for real in [report.get("params_real_size")] if real and real["model"] != "Qwen/Qwen2-VL-7B-Instruct"],
        ("visual encoders ours / reference", f"{encoders['ours']} / {encoders['reference']}"),
        ("check: score vs brute force (max |diff|)", f"{c['score_vs_brute_force_max_abs_diff']:.2e}"),
        ("check: batch vs single (max |diff| logits)", f"{c['batch_vs_single_logits_max_abs_diff']:.2e}"),
    ]


def _stage1_rows(report):
    s = report["stage1"]
    return [
        ("stage 1 model", s["label"]),
        ("device / dtype / quantisation", f"{report['device']} / {report['dtype']} / {s['quantization']}"),
        ("batch (images) / image tokens", f"{s['batch_size']} / {s['image_tokens']}"),
        (f"steps per second ({s['steps_measured']} steps)", s["steps_per_s"]),
        ("seconds per step", s["s_per_step"]),
        ("  scaled to full depth (rough)", s["s_per_step_scaled_to_full_depth"]),
        ("peak memory (MB)", s["memory"]["peak_mb"]),
        ("params of the base (trainable LoRA)", f"{s['params']:,} ({s['trainable_params']:,})"),
    ]


def format_table(report):
    """A plain-text table of the main figures, then the targets (`--train`: the stage-1 figures)."""
    if "stage1" in report:
        rows = _stage1_rows(report)
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
    rows = _inference_rows(report) + _stage_rows(report) + _size_rows(report)
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("")
    note = "" if report["targets_apply"] else " - for information only here"
    lines.append(f"targets ({target_set(report)[0]}){note}")
    for name, t in report["targets"].items():
        value = t["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else value
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        lines.append(f"  {name.ljust(width - 2)}  {shown} {t['target']}: {mark}")
    return "\n".join(lines)


def write_json(report, path):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, allow_nan=False, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
