"""The model card (README.md with YAML metadata) written into RUN/model."""

PART_NAMES = {
    "vlm": "VLM branch (instruction-tuned Qwen2-VL)",
    "distill": "distillation head",
    "teacher": "teacher (not part of the model)",
    "emovlm_kd": "EmoVLM-KD (gate)",
}


def model_card(cfg, labels, results, base_model):
    base = "local demo model" if str(base_model).endswith("base/vlm") else str(base_model)
    dataset = "synthetic demo data" if cfg.dataset == "demo" else cfg.dataset
    rows = "\n".join(
        f"| {PART_NAMES[k]} | {100 * v:.2f} |" for k, v in results["accuracy"].items()
    )
    metadata = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        f"base_model: {base}" if cfg.vlm != "demo" else "base_model: []",
        f"datasets:\n- {dataset}" if cfg.dataset != "demo" else "datasets: []",
        "metrics:\n- accuracy",
        "tags:\n- emovlm-kd\n- visual-emotion-analysis\n- qwen2-vl\n- knowledge-distillation",
        "---",
    ]
    return "\n".join(metadata) + f"""

# EmoVLM-KD

Visual emotion analysis: which emotion an image evokes, among {', '.join(labels)}.
An instruction-tuned Qwen2-VL (base: {base}), a head distilled from a vision teacher on the VLM's own visual
encoder, and a `{cfg.gate_type}` gate that combines the VLM's answer with the head's probabilities.
Trained on {dataset}.

## Use

```python
from transformers import pipeline

classify = pipeline(model="THIS_FOLDER_OR_REPO", trust_remote_code=True)
classify("photo.jpg", top_k=3)
```

## Results ({results['split']} split, {results['num_samples']} images)

| part | accuracy (%) |
|---|---|
{rows}

## Training

Head {cfg.head_hidden_sizes}, alpha {cfg.alpha}, tau {cfg.tau}; learning rates {cfg.sft_lr} (LoRA r={cfg.lora_r},
alpha={cfg.lora_alpha} on {cfg.lora_targets}), {cfg.distill_lr} (head), {cfg.gate_lr} (gate); seed {cfg.seed}.
Method: EmoVLM-KD (arXiv 2505.07164).
"""
