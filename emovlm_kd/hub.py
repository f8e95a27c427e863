"""Writing an EmoVLM-KD bundle as a self-contained Hub folder (weights, config with auto_map, code, processor).

transformers' own registration does the work: `register_for_auto_class` makes `save_pretrained` copy the model and
config files and write `auto_map`; `PIPELINE_REGISTRY.register_pipeline` makes the pipeline's `save_pretrained`
copy the pipeline file and write `custom_pipelines`.
"""

import contextlib
import logging
import shutil
from pathlib import Path

from transformers import AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY

from configuration_emovlm_kd import EmoVLMKDConfig
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

logger = logging.getLogger(__name__)

TASK = "image-classification"
# register_for_auto_class keeps one auto class per model class; AutoModel is the extra entry (HF-NOTES.md)
EXTRA_AUTO_MAP = {"AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification"}


@contextlib.contextmanager
def registered_pipeline():
    """Our pipeline registered for `image-classification` while a bundle is written, the registry restored after
    (so other image-classification models in this process keep transformers' own pipeline)."""
    previous = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    PIPELINE_REGISTRY.supported_tasks.pop(TASK, None)  # no "overwriting" warning for a registration we undo
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=EmoVLMKDImageClassificationPipeline,
                                        pt_model=AutoModelForImageClassification, type="multimodal")
    try:
        yield
    finally:
        if previous is not None:
            PIPELINE_REGISTRY.supported_tasks[TASK] = previous


# what `save_bundle` writes: a folder holding anything else is the user's and is never replaced without `overwrite`
BUNDLE_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "README.md", "splits.json",
}


def foreign_files(folder):
    """Names in `folder` that a bundle does not consist of (sorted; [] for a missing or empty folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in BUNDLE_FILES and not (p.name.startswith("model-") and p.suffix == ".safetensors"))


def save_bundle(model, processor, output_dir, model_card=None, extra_files=None, overwrite=False):
    """Save model + processor + the three code files into `output_dir`, atomically (temp folder, then rename).

    `from_pretrained(output_dir, trust_remote_code=True)` then works through AutoConfig, AutoModel,
    AutoModelForImageClassification and `pipeline(model=output_dir, trust_remote_code=True)`. `model_card` is a
    `huggingface_hub.ModelCard` (or its text), written as README.md; `extra_files` ({name: source path}) are
    copied in (e.g. the split the model was trained on). A folder that holds files a bundle does not consist of is
    the user's: `FileExistsError` names them, unless `overwrite`.
    """
    output_dir = Path(output_dir).resolve()
    foreign = foreign_files(output_dir)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{output_dir} holds files this project did not write ({shown}): choose another "
                              "folder, or overwrite it on purpose (--overwrite)")
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    EmoVLMKDConfig.register_for_auto_class()
    EmoVLMKDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    model.config.auto_map = dict(EXTRA_AUTO_MAP)
    model.config.architectures = [type(model).__name__]
    with registered_pipeline():
        pipe = EmoVLMKDImageClassificationPipeline(model=model, processor=processor, device=model.device)
        pipe.save_pretrained(tmp)  # the model, its code files, auto_map and custom_pipelines
    processor.save_pretrained(tmp)  # the whole processor (the pipeline writes only its parts)
    if model_card is not None:
        (tmp / "README.md").write_text(str(model_card), encoding="utf-8")
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    _replace_folder(tmp, output_dir)
    logger.info("saved EmoVLM-KD bundle to %s", output_dir)
    return output_dir


def _replace_folder(new, target):
    """Put folder `new` at `target`, the old `target` moved aside first and removed once the new one is in place."""
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


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
    return model, processor
