"""A model folder checked before anything runs on it or is written for it; no code from the folder is ever run.

`load_checked_bundle(folder)` loads an EmoVLM-KD bundle with the installed classes and raises
`ModelCheckError(file, problem)` (one line) at the first of these that fails:

1. `config.json`: readable JSON; `id2label` present, its ids the integers 0..N-1 without a gap, N >= 2 distinct
   non-empty names (compared case-insensitively); `label2id`, when present, its inverse; the config's own field
   checks (`EmoVLMKDConfig.validate`); `label_answer_token_ids`: one non-empty list of integer token ids per
   label, every id inside the text model's vocabulary (`vocab_size`), no answer a prefix of another.
2. the weight files (`model.safetensors`, or every shard `model.safetensors.index.json` names): present, header
   readable and data complete (an empty or truncated file fails here, before any tensor is read); then, loaded,
   no tensor of another shape than the config gives (a head or gate for another number of labels), none of the
   model's tensors missing (tied ones excepted, as transformers ties them), none left over.
3. the processor (`AutoProcessor`, no remote code): it loads and has a tokenizer and an image processor; the
   tokenizer's tokens fit the embedding; its image token is the config's; `label_answer_token_ids` are exactly
   what it writes for each label's answer after the prompt (`set_answer_tokens`).

`looks_like_path` and `local_model_folder` import nothing heavy: a `--model` path that does not exist is reported
at once ("no such folder"), never sent to the Hub.
"""

import contextlib
import json
import os
from pathlib import Path

from emovlm_kd.errors import ModelCheckError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
BUNDLE_MODEL_TYPE = "emovlm_kd"


# ----------------------------------------------------------------------------------------------------------------
# Where the model is
# ----------------------------------------------------------------------------------------------------------------


def looks_like_path(name):
    """Whether `name` is meant as a local path: it starts with `/`, `.` or `~`, holds a backslash or a drive
    letter, has more than one `/`, or its first component exists here (`runs/nope` when `runs/` exists). Hub ids
    are `NAME` or `ORG/NAME`, so one `/` alone does not make a path."""
    text = str(name)
    if text.startswith(("/", ".", "~")) or "\\" in text or (len(text) > 1 and text[1] == ":"):
        return True
    if os.sep in text and os.sep != "/":
        return True
    return text.count("/") > 1 or ("/" in text and Path(text.split("/")[0]).expanduser().exists())


def local_model_folder(name):
    """The local folder `name` names, or None when it is a Hub id. A path-looking `name` (or one that cannot be a
    Hub id) that does not exist raises `FileNotFoundError` ("no such folder"); a file, `NotADirectoryError`."""
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"not a folder: {path}")
    if looks_like_path(name) or not _is_repo_id(str(name)):
        raise FileNotFoundError(f"no such folder: {path}")
    return None


def _is_repo_id(text):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def read_config(folder):
    """`folder/config.json` as a dict. No such file: `FileNotFoundError` (not a model folder); a file that is not
    a JSON object: `ModelCheckError`."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: not a model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelCheckError(path, f"not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelCheckError(path, f"not a JSON object but {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# 1. config.json
# ----------------------------------------------------------------------------------------------------------------


def _few(items, count=3):
    items = [str(item) for item in items]
    return ", ".join(items[:count]) + (f" and {len(items) - count} more" if len(items) > count else "")


def check_labels(config, file):
    """The label names in id order from a config dict's `id2label` (`ModelCheckError` naming `file` otherwise:
    missing, a non-integer id, ids other than 0..N-1, fewer than two labels, an empty or repeated name, a
    `label2id` that is not its inverse)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ModelCheckError(file, "no id2label: the model's label names are missing")
    names = {}
    for key, name in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ModelCheckError(file, f"id2label key {key!r} is not an integer id") from None
        if not isinstance(name, str) or not name.strip():
            raise ModelCheckError(file, f"id2label[{key}] is not a label name: {name!r}")
        names[index] = name
    expected = set(range(len(names)))
    if set(names) != expected:
        missing, beyond = sorted(expected - set(names)), sorted(set(names) - expected)
        found = [f"{_few(missing)} missing"] * bool(missing) + [f"{_few(beyond)} beyond"] * bool(beyond)
        raise ModelCheckError(file, f"id2label ids must be 0..{len(names) - 1} without a gap: {', '.join(found)}")
    labels = [names[i] for i in range(len(names))]
    if len(labels) < 2:
        raise ModelCheckError(file, f"id2label holds one label ({labels[0]!r}); a classifier needs two or more")
    folded = [label.strip().lower() for label in labels]
    repeated = sorted({label for label in labels if folded.count(label.strip().lower()) > 1})
    if repeated:
        raise ModelCheckError(file, f"id2label names a label twice: {_few(repeated)}")
    _check_label2id(config.get("label2id"), labels, file)
    return labels


def _check_label2id(label2id, labels, file):
    if label2id is None:
        return
    if not isinstance(label2id, dict):
        raise ModelCheckError(file, "label2id is not a mapping of label names to ids")
    wrong = [label for i, label in enumerate(labels) if str(label2id.get(label)) != str(i)]
    wrong += [label for label in label2id if label not in labels]
    if wrong:
        raise ModelCheckError(file, f"label2id does not match id2label for {_few(wrong)}")


def check_answer_token_ids(config, file):
    """`config.label_answer_token_ids`: one non-empty list of integer ids per label, each id in
    [0, vocab_size), distinct answers none of which is a prefix of another (`ModelCheckError` naming `file`)."""
    from modeling_emovlm_kd import LabelScoringPlan

    answers, labels = config.label_answer_token_ids, config.labels
    vocab_size = config.vlm_config.get_text_config().vocab_size
    if not answers:
        raise ModelCheckError(file, "no label_answer_token_ids: the labels' answers to score are missing")
    if not isinstance(answers, list) or len(answers) != len(labels):
        count = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise ModelCheckError(file, f"label_answer_token_ids holds {count} answers for {len(labels)} labels")
    for index, (label, ids) in enumerate(zip(labels, answers)):
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise ModelCheckError(file, f"label_answer_token_ids[{index}] (label {label!r}) is not a non-empty "
                                        f"list of token ids: {ids!r}")
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            raise ModelCheckError(file, f"label_answer_token_ids[{index}] (label {label!r}) holds token id "
                                        f"{outside[0]}, outside the vocabulary (0..{vocab_size - 1})")
    try:
        LabelScoringPlan(answers)
    except ValueError as error:
        raise ModelCheckError(file, f"label_answer_token_ids: {error}") from None


def load_checked_config(folder):
    """The bundle's `EmoVLMKDConfig`, after `check_labels` and before `check_answer_token_ids`."""
    from configuration_emovlm_kd import EmoVLMKDConfig

    file = Path(folder) / CONFIG_FILE
    check_labels(read_config(folder), file)
    try:
        config = EmoVLMKDConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelCheckError(file, _first_line(error)) from None
    check_answer_token_ids(config, file)
    return config


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------------------------------------------
# 2. The weights
# ----------------------------------------------------------------------------------------------------------------


def weight_files(folder):
    """The safetensors files of `folder` (the index's shards, or `model.safetensors`), each checked with
    `check_safetensors_file`; a missing file or an unreadable index is a `ModelCheckError`."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelCheckError(index, f"not a readable shard index ({_first_line(error)})") from None
        files = [folder / name for name in names]
    else:
        files = [folder / WEIGHTS_FILE]
    for path in files:
        if not path.is_file():
            raise ModelCheckError(path, "missing: the model's weights are not there")
        check_safetensors_file(path)
    return files


def check_safetensors_file(path):
    """`ModelCheckError` unless `path`'s header reads and its data covers the whole file (safetensors checks both
    on opening; no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        size = Path(path).stat().st_size
        raise ModelCheckError(path, f"not a complete safetensors file ({_first_line(error)}; {size:,} bytes): "
                                    "truncated or damaged, copy or export it again") from None


@contextlib.contextmanager
def _no_load_report():
    """transformers' load report table kept off the log (`check_loading_info` states the problem in one line). A
    filter, not a level: transformers runs extra checks when this logger's own level is WARNING or above."""
    from transformers.utils import logging as hf_logging

    def drop(record):
        return "LOAD REPORT" not in str(record.msg)

    logger = hf_logging.get_logger("transformers.modeling_utils")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_checked_weights(folder, config, dtype=None):
    """`EmoVLMKDForImageClassification.from_pretrained(folder, config=config)` (the installed class, safetensors
    only), then `check_loading_info`; a load that fails is a `ModelCheckError` naming the weights."""
    from safetensors import SafetensorError

    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    where = _weights_name(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with _no_load_report():
            model, info = EmoVLMKDForImageClassification.from_pretrained(
                folder, config=config, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:
        raise ModelCheckError(where, f"does not load: {_first_line(error)}") from None
    check_loading_info(info, where, len(config.labels))
    return model


def _weights_name(folder):
    index = Path(folder) / WEIGHTS_INDEX_FILE
    return index if index.is_file() else Path(folder) / WEIGHTS_FILE


def check_loading_info(info, file, num_labels):
    """`ModelCheckError` naming `file` when transformers' loading info (`output_loading_info=True`) lists a tensor
    of another shape than the config gives, a missing tensor, a tensor the model does not have, or an error."""
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, wanted = min(mismatched)
        raise ModelCheckError(file, f"{len(mismatched)} tensor(s) do not fit config.json ({num_labels} labels): "
                                    f"{key} is {list(found)} here but {list(wanted)} for the config")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelCheckError(file, f"incomplete: {len(missing)} of the model's tensors are missing ({_few(missing)})")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise ModelCheckError(file, f"holds {len(unexpected)} tensor(s) this config's model does not have "
                                    f"({_few(unexpected)})")
    errors = list(info.get("error_msgs") or [])
    if errors:
        raise ModelCheckError(file, f"does not load: {_first_line(errors[0])}")


# ----------------------------------------------------------------------------------------------------------------
# 3. The processor
# ----------------------------------------------------------------------------------------------------------------


def register_auto_classes():
    """The installed config and model classes registered for `model_type` "emovlm_kd" (idempotent), so that the
    auto classes (`AutoProcessor` reading config.json among them) find them here instead of asking for the
    folder's code."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from configuration_emovlm_kd import EmoVLMKDConfig
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    AutoConfig.register(BUNDLE_MODEL_TYPE, EmoVLMKDConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForImageClassification):
        auto.register(EmoVLMKDConfig, EmoVLMKDForImageClassification, exist_ok=True)


def load_checked_processor(folder):
    """`AutoProcessor.from_pretrained(folder)` without remote code; `ModelCheckError` naming the folder when it
    does not load or lacks a tokenizer or an image processor."""
    from transformers import AutoProcessor

    register_auto_classes()
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 (a processor's files fail in many libraries' ways: one problem)
        raise ModelCheckError(folder, f"the processor does not load ({type(error).__name__}: "
                                      f"{_first_line(error)})") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelCheckError(folder, f"the processor ({type(processor).__name__}) lacks a tokenizer or an image "
                                      "processor: preprocessor_config.json or processor_config.json is missing")
    return processor


def check_processor_fits(model, processor, folder):
    """The tokenizer's size within the embedding, its image token the config's, and `label_answer_token_ids` what
    it writes for each label's answer (`ModelCheckError` naming the file at fault)."""
    folder = Path(folder)
    tokenizer = processor.tokenizer
    rows = model.vlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelCheckError(folder / "tokenizer.json", f"{len(tokenizer)} tokens, but the model's embedding has "
                                                         f"{rows} rows")
    image_token, expected = getattr(processor, "image_token_id", None), getattr(model.config.vlm_config,
                                                                                "image_token_id", None)
    if image_token is not None and expected is not None and image_token != expected:
        raise ModelCheckError(folder / CONFIG_FILE, f"the image token is id {expected} here but {image_token} for "
                                                    "the tokenizer")
    _check_answers_match_tokenizer(model, processor, folder / CONFIG_FILE)


def _check_answers_match_tokenizer(model, processor, file):
    saved = [list(answer) for answer in model.config.label_answer_token_ids]
    try:
        written = model.set_answer_tokens(processor)
    except ValueError as error:
        raise ModelCheckError(file, _first_line(error)) from None
    finally:
        model.config.label_answer_token_ids = saved
    for index, (label, ours, theirs) in enumerate(zip(model.config.labels, saved, written)):
        if ours != theirs:
            raise ModelCheckError(file, f"label_answer_token_ids[{index}] is {ours}, but the tokenizer writes the "
                                        f"answer for label {label!r} as {theirs}")


# ----------------------------------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------------------------------


def load_checked_bundle(folder, dtype=None):
    """`(model, processor)` of the EmoVLM-KD bundle in local `folder`, every check of this module passed (the
    config and the weight files before any tensor is read), with the installed classes only. The model is in
    eval mode, on the CPU."""
    config = load_checked_config(folder)
    weight_files(folder)
    model = load_checked_weights(folder, config, dtype)
    processor = load_checked_processor(folder)
    check_processor_fits(model, processor, folder)
    return model.eval(), processor


__all__ = [
    "BUNDLE_MODEL_TYPE",
    "check_answer_token_ids",
    "check_labels",
    "check_loading_info",
    "check_processor_fits",
    "check_safetensors_file",
    "load_checked_bundle",
    "load_checked_config",
    "load_checked_processor",
    "load_checked_weights",
    "local_model_folder",
    "looks_like_path",
    "read_config",
    "register_auto_classes",
    "weight_files",
]
