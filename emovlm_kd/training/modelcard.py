"""The model card of RUN/model: `huggingface_hub.ModelCard` with `ModelCardData` metadata, the test accuracies as
`eval_results` (the Hub's `model-index`), and a short text on what the model is and how it was trained."""

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PART_NAMES = {
    "vlm": "VLM branch (instruction-tuned Qwen2-VL)",
    "distill": "distillation head",
    "teacher": "teacher (not part of the model)",
    "emovlm_kd": "EmoVLM-KD (gate)",
}

TEMPLATE = """---
{{ card_data }}
---

# EmoVLM-KD

Visual emotion analysis: which emotion an image evokes, among {{ labels }}.
An instruction-tuned Qwen2-VL (base: {{ base }}), a head distilled from a vision teacher on the VLM's own visual
encoder, and a `{{ cfg.gate_type }}` gate that combines the VLM's answer with the head's probabilities.
Trained on {{ dataset }}.

## Use

```python
from transformers import pipeline

classify = pipeline(model="THIS_FOLDER_OR_REPO", trust_remote_code=True)
classify("photo.jpg", top_k=3)
```

## Results ({{ results.split }} split, {{ results.num_samples }} images)

| part | accuracy (%) |
|---|---|
{% for part, value in results.accuracy.items() -%}
| {{ part_names[part] }} | {{ "%.2f" | format(100 * value) }} |
{% endfor %}
## Training

Head {{ cfg.head_hidden_sizes }}, alpha {{ cfg.alpha }}, tau {{ cfg.tau }}; learning rates {{ cfg.sft_lr }} (LoRA r={{ cfg.lora_r }},
alpha={{ cfg.lora_alpha }} on {{ cfg.lora_targets }}), {{ cfg.distill_lr }} (head), {{ cfg.gate_lr }} (gate); seed {{ cfg.seed }}.
{% if results.instruction_mix %}{% set mix = results.instruction_mix %}
Instruction tuning rows: {{ mix.categorical }} categorical, {{ mix.conversation }} conversation, {{ mix.reasoning }}
reasoning, over {{ mix.train_images }} train images (the paper: all three kinds for every train image{% if not
(mix.conversation or mix.reasoning) %}; this model saw the categorical rows alone, a third of the paper's data{% endif %}).
{% endif %}
{% if cfg.teacher_trained %}Teacher: {{ cfg.teacher_trained }}, fine-tuned beforehand.{% else %}Teacher: {{ cfg.teacher }}
fine-tuned with {{ cfg.teacher_optimizer }}, lr {{ cfg.teacher_lr }}, weight decay {{ cfg.teacher_weight_decay }}, batch
{{ cfg.teacher_batch_size }}, {{ cfg.teacher_epochs }} epochs, {{ cfg.teacher_scheduler }} schedule.{% endif %}
{% if results.gate_data %}{% set gate = results.gate_data %}
Gate data: {% if gate.protocol == "sampled" %}{{ gate.samples_per_image }} answers per train image sampled at
temperature {{ gate.temperature }} ({{ gate.images }} images; one per epoch, cycled; the paper's protocol){% else %}the
VLM's deterministic answers on the {{ gate.split }} split ({{ gate.images }} images){% endif %}.
{% endif %}
Method: EmoVLM-KD (arXiv 2505.07164).
"""


def card_data(cfg, results, base_model):
    """The card's YAML metadata; `eval_results` only for the model's own parts (not the teacher)."""
    dataset = "synthetic demo data" if cfg.dataset == "demo" else str(cfg.dataset)
    evals = [
        EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                   dataset_split=results["split"], metric_type="accuracy", metric_name=f"accuracy ({part})",
                   metric_value=round(100 * value, 2))
        for part, value in results["accuracy"].items() if part != "teacher"
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        base_model=str(base_model) if cfg.vlm != "demo" else None,
        datasets=[dataset] if cfg.dataset != "demo" else None,
        metrics=["accuracy"],
        tags=["emovlm-kd", "visual-emotion-analysis", "qwen2-vl", "knowledge-distillation"],
        model_name="EmoVLM-KD",
        eval_results=evals,
    )


def model_card(cfg, labels, results, base_model):
    """The `ModelCard` written as RUN/model/README.md."""
    base = "local demo model" if cfg.vlm == "demo" else str(base_model)
    dataset = "synthetic demo data" if cfg.dataset == "demo" else cfg.dataset
    return ModelCard.from_template(
        card_data(cfg, results, base_model), template_str=TEMPLATE, labels=", ".join(labels), base=base,
        dataset=dataset, cfg=cfg, results=results, part_names=PART_NAMES,
    )
