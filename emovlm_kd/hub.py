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
from emovlm_kd.folders import check_bundle_folder, respect_umask, staged_folder
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


def save_bundle(model, processor, output_dir, model_card=None, extra_files=None, overwrite=False):
    """Save model + processor + the four code files into `output_dir`, atomically (temp folder, then rename).

    `from_pretrained(output_dir, trust_remote_code=True)` then works through AutoConfig, AutoModel,
    AutoModelForImageClassification and `pipeline(model=output_dir, trust_remote_code=True)`. `model_card` is a
    `huggingface_hub.ModelCard` (or its text), written as README.md; `extra_files` ({name: source path}) are
    copied in (e.g. the split the model was trained on). A folder that holds files a bundle does not consist of is
    the user's: `FileExistsError` names them, unless `overwrite`. The bundle is written into a temp folder beside
    `output_dir` (`emovlm_kd.folders.staged_folder`: a name no user folder has) that then replaces it; an OS error
    (a full disk) is `emovlm_kd.folders.WriteError` naming `output_dir`, with `output_dir` left as it was. Every
    file gets the mode the umask gives new files (0644 under umask 022). The same model and processor give the
    same bytes, whatever the processor was last called with (see `reset_tokenizer_call_state`).
    """

    output_dir = Path(output_dir).resolve()
    check_bundle_folder(output_dir, overwrite)
    EmoVLMKDConfig.register_for_auto_class()
    EmoVLMKDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    model.config.auto_map = dict(EXTRA_AUTO_MAP)
    model.config.architectures = [type(model).__name__]
    model.config.vlm_config._name_or_path = ""  # where the backbone was loaded from: a local path, not published
    reset_tokenizer_call_state(processor)
    with staged_folder(output_dir) as tmp:  # `.NAME.emovlm-kd-PID-TOKEN.tmp`, then it replaces output_dir
        with registered_pipeline():
            pipe = EmoVLMKDImageClassificationPipeline(model=model, processor=processor, device=model.device)
            pipe.save_pretrained(tmp)  # the model, its code files, auto_map and custom_pipelines
        processor.save_pretrained(tmp)  # the whole processor (the pipeline writes only its parts)
        if model_card is not None:
            (tmp / "README.md").write_text(str(model_card), encoding="utf-8")
        for name, source in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # e.g. examples/<label>.png
            shutil.copyfile(source, tmp / name)
        respect_umask(tmp)  # safetensors writes model.safetensors 0600; every file gets the umask's mode
    logger.info("saved EmoVLM-KD bundle to %s", output_dir)
    return output_dir


def reset_tokenizer_call_state(processor):
    """Drop the padding and truncation the fast tokenizer's backend keeps from its last call (transformers sets
    both afresh on every call), so that tokenizer.json does not depend on what the processor last encoded."""
    backend = getattr(getattr(processor, "tokenizer", processor), "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()


# what a bundle needs from the Hub: weights, configs, tokenizer and processor files; never the code files
BUNDLE_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "examples/*.png"]


def checkpoint_model_type(model_id):
    """The `model_type` in a checkpoint's config.json (folder or Hub id), read without running any of its code.

    A path-looking id that does not exist raises `FileNotFoundError` ("no such folder") without asking the Hub;
    a local config.json that is not JSON raises `ModelCheckError`.
    """
    from emovlm_kd.modelcheck import local_model_folder, read_config

    folder = local_model_folder(model_id)
    return read_config(folder).get("model_type") if folder is not None else _hub_model_type(model_id)


def _hub_model_type(model_id):
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(str(model_id))
    return config_dict.get("model_type")


def model_folder(model_id):
    """The local folder of a model: `model_id` itself, or the Hub snapshot of the files `BUNDLE_DOWNLOAD_PATTERNS`
    names (the code files are never fetched). `FileNotFoundError` for a path-looking id that does not exist."""
    from emovlm_kd.modelcheck import local_model_folder

    folder = local_model_folder(model_id)
    return folder if folder is not None else _hub_snapshot(model_id)


def _hub_snapshot(model_id):
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_id), allow_patterns=BUNDLE_DOWNLOAD_PATTERNS))


def load_model(model_id, *, device=None, dtype=None, trust_remote_code=False, bare_vlm=False):
    """`(model, processor, zero_shot)` of a model folder or Hub id: the one loader of `predict`, `evaluate`, `table1`
    and the demo. No code from the model's folder runs unless `trust_remote_code`.

    config.json's `model_type` decides, read without running any code (`checkpoint_model_type`):
    - "emovlm_kd": the bundle, with this package's `EmoVLMKDForImageClassification` and processor classes, after
      every check of `emovlm_kd.modelcheck` (`ModelCheckError`, one line naming the file at fault); zero_shot False.
    - with `bare_vlm` (evaluate, table1): a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, or with `trust_remote_code`
      any other, as `AutoModelForImageTextToText` (the zero-shot baseline, see `evaluation.runner.bind_labels`);
      zero_shot True.
    - without it (predict, the demo): with `trust_remote_code`, any other model with the code it ships, through
      `AutoModelForImageClassification`, after its config's labels and its weight files are checked.
    Anything else raises `ValueError`. A path-looking `model_id` that does not exist raises `FileNotFoundError`
    ("no such folder") without asking the Hub; a Hub id that cannot be fetched, the Hub's `OSError`. The model is
    in eval mode, moved to `device` when one is given.
    """
    from configuration_emovlm_kd import SUPPORTED_BACKBONES
    from emovlm_kd.modelcheck import BUNDLE_MODEL_TYPE, load_checked_bundle, local_model_folder, read_config

    folder = local_model_folder(model_id)  # None for a Hub id
    model_type = read_config(folder).get("model_type") if folder is not None else _hub_model_type(model_id)
    if model_type == BUNDLE_MODEL_TYPE:
        model, processor = load_checked_bundle(folder or _hub_snapshot(model_id), dtype=dtype)
    elif bare_vlm and (model_type in SUPPORTED_BACKBONES or trust_remote_code):
        model, processor = _load_bare_vlm(model_id, model_type, dtype, trust_remote_code)
    elif trust_remote_code and not bare_vlm:
        model, processor = _load_with_its_own_code(model_id, folder or _hub_snapshot(model_id), dtype)
    elif bare_vlm:
        raise ValueError(
            f"{model_id} has model_type {model_type!r}: expected an EmoVLM-KD bundle ({BUNDLE_MODEL_TYPE}) "
            f"or a Qwen2-VL checkpoint for the zero-shot baseline ({', '.join(SUPPORTED_BACKBONES)}); "
            "--trust-remote-code loads other checkpoints with the code they ship"
        )
    else:
        raise ValueError(f"{model_id} is not an EmoVLM-KD bundle (config.json model_type {model_type!r}, not "
                         f"{BUNDLE_MODEL_TYPE!r}); to run the code it ships, pass --trust-remote-code")
    if device is not None:
        model.to(device)
    return model, processor, model_type != BUNDLE_MODEL_TYPE and bare_vlm


def load_bundle(path, dtype=None, device=None, trust_remote_code=False):
    """(model, processor) from an EmoVLM-KD bundle folder or Hub id, checked, with the installed classes: `load_model`
    without the zero-shot baseline."""
    model, processor, _ = load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, processor


def _load_bare_vlm(model_id, model_type, dtype, trust_remote_code):
    """`(vlm, processor)` of a bare VLM checkpoint (the zero-shot baseline)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": dtype} if dtype is not None else {}
    vlm = AutoModelForImageTextToText.from_pretrained(model_id, use_safetensors=True,
                                                      trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    logger.info("%s is a bare %s checkpoint: evaluating the zero-shot VLM branch only", model_id, model_type)
    return vlm.eval(), processor


def _load_with_its_own_code(path, folder, dtype):
    """A model that is not an EmoVLM-KD bundle, loaded with the code it ships (the caller opted in), after the
    checks that need no class: its config's labels and its weight files."""
    from transformers import AutoModelForImageClassification, AutoProcessor

    from emovlm_kd.modelcheck import CONFIG_FILE, check_labels, read_config, weight_files

    check_labels(read_config(folder), Path(folder) / CONFIG_FILE)
    weight_files(folder)
    logger.warning("%s is not an EmoVLM-KD bundle: loading it with its own code (--trust-remote-code)", path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True, trust_remote_code=True,
                                                            **kwargs)
    return model.eval(), AutoProcessor.from_pretrained(path, trust_remote_code=True)
