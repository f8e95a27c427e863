"""The model card of RUN/model: `huggingface_hub.ModelCard` with `ModelCardData` metadata, the test accuracies as
`eval_results` (the Hub's `model-index`), and a short text on what the model is and how it was trained.

What the metadata says about the base model and the data holds Hub ids only (a local path means nothing on the Hub):
- `base_model`: the VLM's Hub id; for a local folder, the id it was downloaded as (a Hub cache snapshot
  `models--ORG--NAME/snapshots/REV`) or the `base_model` of the folder's own README.md; otherwise left out.
- `license`: `--license` when given, else the base model's (its README.md metadata: the local folder's, or the Hub
  card when the Hub is reachable); left out, with a warning, when it cannot be read.
- `tags`: the backbone's `model_type` (qwen2_vl -> `qwen2-vl`, qwen2_5_vl -> `qwen2.5-vl`, ...).
- `datasets`: the dataset's Hub id when `--dataset` is one (not an existing local path).
- `pipeline_tag: image-classification` and `widget:`, the Hub's inference widget: one entry per example image the
  export writes into the bundle (`write_widget_examples`: `examples/<label>.png` for the first labels, pictures of the demo
  data's generator, not the dataset's, whose licence may not allow sharing them), each `{src, example_title}` as the
  Hub's widget metadata takes them (https://huggingface.co/docs/hub/models-widgets, "Example inputs"; huggingface.js
  `packages/tasks/src/widget-example.ts`, `WidgetExampleAssetInput.src`): `src` is the file's
  `https://huggingface.co/REPO/resolve/main/examples/...` URL when the repo id is known, the relative path otherwise.

The text shows the `pipeline` snippet and the demo command (`emovlm-kd demo --model REPO`).
"""

import logging
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from emovlm_kd.data.examples import widget_example_names, write_widget_examples  # noqa: F401  (the export's)
from emovlm_kd.training.config import demo_backbone

logger = logging.getLogger(__name__)

HUB_URL = "https://huggingface.co"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")

PART_NAMES = {
    "vlm": "VLM branch (instruction-tuned Qwen-VL)",
    "distill": "distillation head",
    "teacher": "teacher (not part of the model)",
    "emovlm_kd": "EmoVLM-KD (gate)",
}

TEMPLATE = """---
{{ card_data }}
---

# EmoVLM-KD

Visual emotion analysis: which emotion an image evokes, among {{ labels }}.
An instruction-tuned Qwen-VL (base: {{ base }}), a head distilled from a vision teacher on the VLM's own visual
encoder, and a `{{ cfg.gate_type }}` gate that combines the VLM's answer with the head's probabilities.
Trained on {{ dataset }}.

## Use

```python
from transformers import pipeline

classify = pipeline(model="{{ repo_id }}", trust_remote_code=True)
classify("photo.jpg", top_k=3)
```

## Demo

Try it in the browser (a Gradio app: the label distribution, what each branch said, the model's explanation, a
batch tab with a CSV):

```bash
pip install "emovlm-kd[demo]"
emovlm-kd demo --model {{ repo_id }}
```

## Results ({{ results.split }} split, {{ results.num_samples }} images)

| part | accuracy (%) |
|---|---|
{% for part, value in results.accuracy.items() -%}
| {{ part_names[part] }} | {{ "%.2f" | format(100 * value) }} |
{% endfor %}
{% if results.calibration %}
Calibration (temperature scaling: the logits divided by T, fitted on held-out images; ECE on the
{{ results.split }} split, 15 bins):

| part | temperature | fitted on | ECE before | ECE after |
|---|---|---|---|---|
{% for name, part in results.calibration.items() -%}
| {{ part_names["emovlm_kd" if name == "gate" else "distill"] }} | {{ "%.4f" | format(part.temperature) }} | {{ part.fitted_on }} | {{ "%.4f" | format(part.test_ece_before) }} | {{ "%.4f" | format(part.test_ece_after) }} |
{% endfor %}
{% for name, part in results.calibration.items() if part.error -%}
**Calibration error ({{ name }}):** {{ part.error }}.
{% endfor %}
{% endif %}## Training

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


def hub_id_of(name_or_path):
    """The Hub id a model name or local folder stands for, or None (see the module docstring)."""
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        return str(name_or_path) if HUB_ID.match(str(name_or_path)) else None
    match = SNAPSHOT.search(path.resolve().as_posix())
    if match:
        return f"{match['org']}/{match['name']}"
    card = local_card(path)
    base = getattr(card.data, "base_model", None) if card else None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and HUB_ID.match(base) else None


def local_card(folder):
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True)
    except Exception as error:  # a hand-written README without metadata is not an error
        logger.debug("could not read %s: %s", readme, error)
        return None


def inherited_license(name_or_path):
    """The base model's license from its card's metadata (the local folder's README.md, else the Hub card), or
    None when it cannot be read (no card, no network)."""
    path = Path(str(name_or_path)).expanduser()
    card = local_card(path) if path.is_dir() else None
    if card is None and not path.exists() and HUB_ID.match(str(name_or_path)):
        card = hub_card(str(name_or_path))
    return getattr(card.data, "license", None) if card else None


def hub_card(repo_id):
    """The Hub card of `repo_id`: from the Hub cache, else from the Hub when one probe finds it reachable (no
    download retries at the end of a run without network); None when it cannot be read."""
    from huggingface_hub import try_to_load_from_cache

    from emovlm_kd.training.preflight import HubAccess

    cached = try_to_load_from_cache(repo_id, "README.md")
    if not isinstance(cached, str) and not HubAccess().reachable:
        return None
    try:
        return ModelCard.load(cached if isinstance(cached, str) else repo_id)
    except Exception as error:  # gated or missing: the license stays unknown
        logger.debug("could not read the card of %s: %s", repo_id, error)
        return None


def backbone_tag(model_type):
    """`qwen2_vl` -> `qwen2-vl`, `qwen2_5_vl` -> `qwen2.5-vl`, `qwen3_vl` -> `qwen3-vl`."""
    return re.sub(r"(\d)_(\d)", r"\1.\2", str(model_type)).replace("_", "-")


def dataset_hub_id(dataset):
    return None if dataset == "demo" or Path(str(dataset)).expanduser().exists() or not HUB_ID.match(str(dataset)) \
        else str(dataset)


def dataset_shown(dataset):
    """The dataset's name on the card: its Hub id, else its folder's name ("synthetic demo data" for the demo's)."""
    return "synthetic demo data" if dataset == "demo" else (dataset_hub_id(dataset) or Path(str(dataset)).name)


def card_license(license, vlm, base_model):
    """`license` (--license), else the base model's; a warning when neither is known (not for the offline demo,
    `vlm` demo)."""
    chosen = license or inherited_license(base_model)
    if chosen is None and demo_backbone(vlm) is None:
        logger.warning("the model card has no license: the base model's card (%s) could not be read; set --license",
                       base_model)
    return chosen


def widget_examples(examples, repo_id=None):
    """The `widget:` metadata for bundle-relative example files (a list, or `{name: title}` as
    `widget_example_names` gives): `[{"src", "example_title"}]`, `src` the Hub's `resolve/main` URL of the file
    when `repo_id` is known, else the relative path; the title the label (else the file's name)."""
    titles = examples if isinstance(examples, dict) else {name: Path(name).stem for name in examples}
    entries = []
    for name, title in titles.items():
        name = Path(name).as_posix()
        src = f"{HUB_URL}/{repo_id}/resolve/main/{name}" if repo_id else name
        entries.append({"src": src, "example_title": title})
    return entries


def card_data(results, base_model, *, dataset, vlm, license=None, backbone_type="qwen2_vl", examples=(),
              repo_id=None):
    """The card's YAML metadata (`dataset`, `vlm`, `license`: the run's settings); `eval_results` only for the model's
    own parts (not the teacher); `widget` for the `examples` (bundle-relative file names)."""
    shown, dataset = dataset_shown(dataset), dataset_hub_id(dataset)
    evals = [
        EvalResult(task_type="image-classification", dataset_type=dataset or shown, dataset_name=shown,
                   dataset_split=results["split"], metric_type="accuracy", metric_name=f"accuracy ({part})",
                   metric_value=round(100 * value, 2))
        for part, value in results["accuracy"].items() if part != "teacher"
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=card_license(license, vlm, base_model),
        base_model=hub_id_of(base_model) if demo_backbone(vlm) is None else None,
        datasets=[dataset] if dataset else None,
        metrics=["accuracy"],
        tags=["emovlm-kd", "visual-emotion-analysis", backbone_tag(backbone_type), "knowledge-distillation"],
        model_name="EmoVLM-KD",
        eval_results=evals,
        widget=widget_examples(examples, repo_id) or None,
    )


def model_card(cfg, labels, results, base_model, backbone_type="qwen2_vl", repo_id=None, examples=()):
    """The `ModelCard` written as RUN/model/README.md; the usage snippet and the demo command name `repo_id` (the
    `--push-to-hub` repo) when given. `examples`: the bundle-relative names of the example images the export writes
    (`widget_example_names`: `{name: label}`, or a list of names), listed as the widget's inputs."""
    repo_id = repo_id or getattr(cfg, "push_to_hub", None)
    base = "local demo model" if demo_backbone(cfg.vlm) is not None else (hub_id_of(base_model) or str(cfg.vlm))
    dataset = dataset_shown(cfg.dataset)
    return ModelCard.from_template(
        card_data(results, base_model, dataset=cfg.dataset, vlm=cfg.vlm, license=getattr(cfg, "license", None),
                  backbone_type=backbone_type, examples=examples, repo_id=repo_id),
        template_str=TEMPLATE, labels=", ".join(labels), base=base, dataset=dataset, cfg=cfg, results=results,
        part_names=PART_NAMES, repo_id=repo_id or "THIS_FOLDER_OR_REPO",
    )
