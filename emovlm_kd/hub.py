"""Writing an EmoVLM-KD bundle as a self-contained Hub folder (weights, config with auto_map, code, processor)."""

import logging
import os
import shutil
from pathlib import Path

import configuration_emovlm_kd
import modeling_emovlm_kd
import pipeline_emovlm_kd

logger = logging.getLogger(__name__)

CODE_FILES = [configuration_emovlm_kd.__file__, modeling_emovlm_kd.__file__, pipeline_emovlm_kd.__file__]

AUTO_MAP = {
    "AutoConfig": "configuration_emovlm_kd.EmoVLMKDConfig",
    "AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
    "AutoModelForImageClassification": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
}

CUSTOM_PIPELINES = {
    "image-classification": {
        "impl": "pipeline_emovlm_kd.EmoVLMKDImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "tf": [],
        "type": "multimodal",
    }
}


def save_bundle(model, processor, output_dir, model_card=None, safe_serialization=True):
    """Save model + processor + the three code files into `output_dir`, atomically (temp folder, then rename).

    `from_pretrained(output_dir, trust_remote_code=True)` then works through AutoConfig, AutoModel,
    AutoModelForImageClassification and `pipeline(model=output_dir, trust_remote_code=True)`.
    """
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.custom_pipelines = {k: dict(v) for k, v in CUSTOM_PIPELINES.items()}
    model.config.architectures = ["EmoVLMKDForImageClassification"]
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for path in CODE_FILES:
        shutil.copyfile(path, tmp / os.path.basename(path))
    if model_card is not None:
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
    if output_dir.exists():
        old = output_dir.with_name(output_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        output_dir.rename(old)
        tmp.rename(output_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(output_dir)
    logger.info("saved EmoVLM-KD bundle to %s", output_dir)
    return output_dir


def load_bundle(path, dtype=None, device=None):
    """(model, processor) from a bundle folder or Hub id, through the auto classes and remote code."""
    from transformers import AutoModelForImageClassification, AutoProcessor

    kwargs = {"trust_remote_code": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True, **kwargs).eval()
    if device is not None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model.attach_tokenizer(processor.tokenizer)
    return model, processor
