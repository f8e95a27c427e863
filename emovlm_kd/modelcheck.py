"""A model folder checked before anything runs on it or is written for it; no code from the folder is ever run.

`load_checked_bundle(folder)` loads an EmoVLM-KD bundle with the installed classes and raises
`ModelCheckError(file, problem)` (one line) at the first of these that fails:

1. `config.json`, as it is, before any object is built from it: readable JSON; `id2label` present, its ids the
   integers 0..N-1 without a gap, N >= 2 distinct non-empty names (compared case-insensitively, in linear time);
   `label2id`, when present, its inverse; `vlm_config` and each of its sub-configs present, objects of the right
   `model_type` (a missing one would be filled with a full-size default); no count of layers, blocks or experts
   above the number of tensors the weight files hold. Then the config's own field checks
   (`EmoVLMKDConfig.validate`); `label_answer_token_ids`: one non-empty list of integer token ids per label, every
   id inside the text model's vocabulary (`vocab_size`), no answer a prefix of another.
2. the weight files (`model.safetensors`, or every shard `model.safetensors.index.json` names): present, header
   readable and data complete (an empty or truncated file fails here, before any tensor is read); the tensors
   their headers declare exactly those of the config's model, built on the meta device (no memory): none of
   another shape (a head or gate for another number of labels, a backbone of other sizes), none missing (tied ones
   excepted, as transformers ties them), none left over. So what a load allocates is what the files hold. Then,
   loaded, the same from transformers' loading info, and every tensor finite (no NaN, no infinity).
3. the processor (`AutoProcessor`, no remote code): it loads and has a tokenizer and an image processor; the
   tokenizer's tokens fit the embedding; its image token is the config's; its chat template renders the
   classification and the reasoning prompt; `label_answer_token_ids` are exactly what it writes for each label's
   answer after the prompt (`set_answer_tokens`).

`looks_like_path` and `local_model_folder` import nothing heavy: a `--model` path that does not exist is reported
at once ("no such folder"), never sent to the Hub.
"""

import contextlib
import json
import os
import re
from pathlib import Path

from emovlm_kd.errors import ModelCheckError, few, first_line

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


def run_folder_hint(folder):
    """'; ...' naming `folder/model` when `folder` is a training run's folder (RUN, given for its model RUN/model:
    it holds `model/config.json`), else ''."""
    model = Path(folder) / "model"
    if (model / CONFIG_FILE).is_file():
        return f"; it is a training run's folder: its model is {model}, pass that"
    return ""


def read_config(folder):
    """`folder/config.json` as a dict. No such file: `FileNotFoundError` (not a model folder); a file that is not
    a JSON object: `ModelCheckError`."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: not a model folder" + run_folder_hint(folder))
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
        found = [f"{few(missing, 3)} missing"] * bool(missing) + [f"{few(beyond, 3)} beyond"] * bool(beyond)
        raise ModelCheckError(file, f"id2label ids must be 0..{len(names) - 1} without a gap: {', '.join(found)}")
    labels = [names[i] for i in range(len(names))]
    if len(labels) < 2:
        raise ModelCheckError(file, f"id2label holds one label ({labels[0]!r}); a classifier needs two or more")
    seen, repeated = {}, set()  # linear in the number of labels (a config may hold hundreds of thousands)
    for label in labels:
        folded = label.strip().lower()
        if folded in seen:
            repeated.update((seen[folded], label))
        seen.setdefault(folded, label)
    repeated = sorted(repeated)
    if repeated:
        raise ModelCheckError(file, f"id2label names a label twice: {few(repeated, 3)}")
    _check_label2id(config.get("label2id"), labels, file)
    return labels


def _check_label2id(label2id, labels, file):
    if label2id is None:
        return
    if not isinstance(label2id, dict):
        raise ModelCheckError(file, "label2id is not a mapping of label names to ids")
    known = set(labels)
    wrong = [label for i, label in enumerate(labels) if str(label2id.get(label)) != str(i)]
    wrong += [label for label in label2id if label not in known]
    if wrong:
        raise ModelCheckError(file, f"label2id does not match id2label for {few(wrong, 3)}")


def check_answer_token_ids(config, file):
    """`config.label_answer_token_ids`: one non-empty list of integer ids per label, each id in
    [0, vocab_size), distinct answers none of which is a prefix of another (`ModelCheckError` naming `file`)."""
    from scoring_emovlm_kd import LabelScoringPlan

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


def check_sub_configs(config, file):
    """`ModelCheckError` naming `file` unless a config dict's `vlm_config` is an object naming a backbone
    `model_type` this transformers knows, with each sub-config its class declares (a Qwen-VL's `text_config` and
    `vision_config`) an object of that sub-config's own `model_type`. A sub-config left out (or `null`) would be
    filled with transformers' defaults: a full-size backbone (tens of GB) built before any weight is read."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    vlm = config.get("vlm_config")
    if not isinstance(vlm, dict):
        raise ModelCheckError(file, f"vlm_config is {_kind(vlm)}, not the backbone's config (an object with its "
                                    "model_type, text_config and vision_config): the config is incomplete")
    vlm_type = vlm.get("model_type")
    if not isinstance(vlm_type, str) or vlm_type not in CONFIG_MAPPING:
        raise ModelCheckError(file, f"vlm_config.model_type {vlm_type!r} is not a backbone this transformers knows "
                                    "(EmoVLM-KD's: qwen2_vl, qwen2_5_vl, qwen3_vl)")
    for name, sub_class in getattr(CONFIG_MAPPING[vlm_type], "sub_configs", {}).items():
        sub = vlm.get(name)
        if not isinstance(sub, dict):
            raise ModelCheckError(file, f"vlm_config.{name} is {_kind(sub)}, not a {vlm_type} {name}: the config "
                                        "is incomplete")
        wanted = getattr(sub_class, "model_type", "")
        if wanted and sub.get("model_type", wanted) != wanted:
            raise ModelCheckError(file, f"vlm_config.{name} has model_type {sub.get('model_type')!r}, not "
                                        f"{wanted!r} as a {vlm_type} backbone's")


def _kind(value):
    return "missing (null)" if value is None else f"a {type(value).__name__}"


# integer fields that make the model build that many modules (layers, vision blocks, experts); `max_...` are bounds
COUNT_FIELD = re.compile(r"(layers|depth|experts)$")


def count_fields(config):
    """`(dotted name, value)` of every integer field of a config dict (nested objects included) that counts
    modules the model would build: names ending in `layers`, `depth` or `experts`, not starting with `max_`."""
    stack = [("", config)]
    while stack:
        prefix, tree = stack.pop()
        for key, value in tree.items():
            if isinstance(value, dict) and key not in ("id2label", "label2id"):
                stack.append((f"{prefix}{key}.", value))
            elif (type(value) is int and isinstance(key, str) and COUNT_FIELD.search(key)
                  and not key.startswith("max_")):
                yield f"{prefix}{key}", value


def check_counts(config, tensor_count, file):
    """`ModelCheckError` naming `file` when a config dict counts more layers, blocks or experts (`count_fields`)
    than the weight files hold tensors in all: each of them holds at least one, so such a config cannot describe
    these weights, and is refused before any object it would build (a config, a model on the meta device) exists."""
    for name, value in count_fields(config):
        if value > tensor_count:
            raise ModelCheckError(file, f"{name} is {value:,}, but the weights hold {tensor_count:,} tensors in all: "
                                        "the config does not describe these weights")


def load_checked_config(folder):
    """The bundle's `EmoVLMKDConfig`, checked against its weight files' headers before any tensor exists:
    `check_labels`, `check_sub_configs` and `check_counts` on config.json as it is, before any object is built from
    it; then `check_weights_fit_config` (a model on the meta device) and `check_answer_token_ids`."""
    from configuration_emovlm_kd import EmoVLMKDConfig

    file = Path(folder) / CONFIG_FILE
    raw = read_config(folder)
    check_labels(raw, file)
    check_sub_configs(raw, file)
    shapes = weight_shapes(weight_files(folder))
    check_counts(raw, len(shapes), file)
    try:
        config = EmoVLMKDConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelCheckError(file, first_line(error)) from None
    check_weights_fit_config(config, shapes, _weights_name(folder))
    check_answer_token_ids(config, file)
    return config


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
            raise ModelCheckError(index, f"not a readable shard index ({first_line(error)})") from None
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
        raise ModelCheckError(path, f"not a complete safetensors file ({first_line(error)}; {size:,} bytes): "
                                    "truncated or damaged, copy or export it again") from None


def weight_shapes(files):
    """`{name: (shape, file)}` of every tensor the safetensors `files` declare, read from their headers only (no
    tensor data is read); a name in two files is a `ModelCheckError`."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name in shapes:
                    raise ModelCheckError(path, f"tensor {name} is also in {Path(shapes[name][1]).name}")
                shapes[name] = (tuple(handle.get_slice(name).get_shape()), path)
    return shapes


def build_on_meta(config, file):
    """`EmoVLMKDForImageClassification(config)` on the meta device: every tensor's shape, no memory for any. A config
    that does not build is a `ModelCheckError` naming `file`."""
    import torch

    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    try:
        with torch.device("meta"):
            return EmoVLMKDForImageClassification(config)
    except Exception as error:  # noqa: BLE001 (a backbone's constructor fails in many ways: one problem)
        raise ModelCheckError(file, f"the model does not build from this config ({type(error).__name__}: "
                                    f"{first_line(error)})") from None


def checkpoint_names(model, names):
    """`{file name: model name}`: the tensor names of a weights file as `from_pretrained` renames them for `model`
    (transformers' conversion mapping, e.g. Qwen2-VL's `model.layers.*` -> `model.language_model.layers.*`). Names
    a converter would merge or split (none in the supported backbones) map to None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # another transformers: the names as they are (a mismatch then shows as missing tensors)
        return {name: name for name in names}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    renamed = {}
    for name in names:
        target, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        renamed[name] = None if converted is not None else target
    return renamed


def check_weights_fit_config(config, shapes, file):
    """`ModelCheckError` naming `file` unless the tensors the weight headers declare (`weight_shapes`) are those the
    config's model has, each of its shape (tied tensors may be left out, as transformers ties them): what
    `check_loading_info` says after a load, said before one, from a model built on the meta device."""
    model = build_on_meta(config, Path(file).parent / CONFIG_FILE)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    renamed = checkpoint_names(model, shapes)
    found, unexpected, mismatched = set(), [], []
    for source, target in renamed.items():
        if target is None:  # merged or split on load: its shape is not the model's; the load's own check sees it
            continue
        if target not in expected:
            unexpected.append(source)
            continue
        found.add(target)
        if shapes[source][0] != expected[target]:
            mismatched.append((target, shapes[source][0], expected[target]))
    converted = any(target is None for target in renamed.values())
    missing = [] if converted else [name for name in expected if name not in found and name not in tied]
    check_loading_info({"mismatched_keys": mismatched, "missing_keys": missing, "unexpected_keys": unexpected},
                       file, len(config.labels))


def check_finite(model, file, chunk=1 << 24):
    """`ModelCheckError` naming `file` and the tensor when a floating-point tensor of `model` holds a NaN or an
    infinity (weights overwritten, or a training run that diverged). Screened by each tensor's sum (a NaN or an
    infinity makes it non-finite; one pass, no copy), then counted in chunks of `chunk` values where the sum is not
    finite (a sum that overflowed is not an error)."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
                continue
            flat = tensor.reshape(-1)
            bad = sum(int((~torch.isfinite(flat[i : i + chunk])).sum()) for i in range(0, flat.numel(), chunk))
            if bad:
                raise ModelCheckError(file, f"tensor {name} holds {bad:,} NaN or infinite value(s) of "
                                            f"{flat.numel():,}: the weights are damaged (overwritten, or a training "
                                            "run that diverged); copy or export them again")


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


def load_checked_weights(folder, config, dtype=None, **placed):
    """`EmoVLMKDForImageClassification.from_pretrained(folder, config=config)` (the installed class, safetensors
    only), then `check_loading_info`; a load that fails is a `ModelCheckError` naming the weights. `placed`: a
    quantised load's `quantization_config` and `device_map` (`hub.load_model`)."""
    from safetensors import SafetensorError

    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    where = _weights_name(folder)
    kwargs = {"dtype": dtype, **placed} if dtype is not None else dict(placed)
    try:
        with _no_load_report():
            model, info = EmoVLMKDForImageClassification.from_pretrained(
                folder, config=config, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:
        raise ModelCheckError(where, f"does not load: {first_line(error)}") from None
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
        raise ModelCheckError(file, f"incomplete: {len(missing)} of the model's tensors are missing "
                                    f"({few(missing, 3)})")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise ModelCheckError(file, f"holds {len(unexpected)} tensor(s) this config's model does not have "
                                    f"({few(unexpected, 3)})")
    errors = list(info.get("error_msgs") or [])
    if errors:
        raise ModelCheckError(file, f"does not load: {first_line(errors[0])}")


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
                                      f"{first_line(error)})") from None
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
    check_chat_template(processor, model.config, folder)
    _check_answers_match_tokenizer(model, processor, folder / CONFIG_FILE)


# where a processor's chat template is saved, in the order transformers reads them
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


def check_chat_template(processor, config, folder):
    """`ModelCheckError` naming the template's file when the processor's chat template does not render the two
    prompts the model is asked (the classification prompt and the reasoning instruction, one image each): a template
    that raises (a sandbox violation, an undefined name, a syntax error) is refused here, not at the first image.
    The trial render runs in a forked child bounded in time and memory (`bounded_in_child`), so a template written
    to cost (`{{ 'x' * 10**10 }}`, loops in loops) is refused too, without taking this process down."""
    folder = Path(folder)
    file = next((folder / name for name in CHAT_TEMPLATE_FILES if (folder / name).is_file()), folder)
    try:
        problem = bounded_in_child(lambda: _chat_template_problem(processor, config), TEMPLATE_SECONDS,
                                   TEMPLATE_MEMORY)
    except TimeoutError:
        problem = f"the chat template takes more than {TEMPLATE_SECONDS:g} s to render the prompt"
    except MemoryError:
        problem = f"the chat template needs more than {TEMPLATE_MEMORY >> 20} MiB to render the prompt"
    if problem is not None:
        raise ModelCheckError(file, problem)


TEMPLATE_SECONDS = 10.0  # a real chat template renders in milliseconds
TEMPLATE_MEMORY = 512 << 20  # bytes the trial render may allocate


def _chat_template_problem(processor, config):
    """What is wrong with rendering the two prompts (one line), or None."""
    from scoring_emovlm_kd import EXPLANATION_QUESTION, chat_prompt

    for instruction in (config.classification_prompt(), EXPLANATION_QUESTION):
        try:
            prompt = chat_prompt(processor, instruction)
        except MemoryError:
            raise  # past the bound of `bounded_in_child`: said by the caller
        except Exception as error:  # noqa: BLE001 (jinja2's errors, or a template calling what fails: one problem)
            return f"the chat template does not render the prompt ({type(error).__name__}: {first_line(error)})"
        if not isinstance(prompt, str):
            return f"the chat template renders a {type(prompt).__name__}, not text"
    return None


def bounded_in_child(problem_of, seconds, memory):
    """`problem_of()` (a one-line problem or None) run in a forked child that may allocate `memory` more bytes
    (RLIMIT_AS above its size at the fork) and run `seconds`: its answer, or `TimeoutError` / `MemoryError` here when
    the child went past a bound (and was ended). Where there is no `fork` (Windows), `problem_of()` runs here,
    unbounded."""
    import select
    import signal

    if not hasattr(os, "fork"):
        return problem_of()
    read_end, write_end = os.pipe()
    with _tokenizers_quiet_at_fork():
        pid = os.fork()
    if pid == 0:  # the child: bound itself, answer through the pipe, never return into the caller's code
        try:
            os.close(read_end)
            _limit_memory(memory)
            answer = problem_of()
            os.write(write_end, json.dumps({"problem": answer}).encode())
        except MemoryError:
            os.write(write_end, json.dumps({"memory": True}).encode())
        except BaseException as error:  # noqa: BLE001 (anything in the child is one line for the parent)
            os.write(write_end, json.dumps({"problem": f"{type(error).__name__}: {first_line(error)}"}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], seconds)
        chunks = []
        while ready:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not ready:
        raise TimeoutError(f"more than {seconds:g} s")
    try:
        answer = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        answer = {}
    if answer.get("memory") or "problem" not in answer:  # a child ended by the allocator, or killed
        raise MemoryError(f"more than {memory >> 20} MiB")
    return answer["problem"]


def _limit_memory(extra):
    """RLIMIT_AS at this process's current address space plus `extra` bytes (Linux; elsewhere no limit)."""
    import resource

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + extra
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


@contextlib.contextmanager
def _tokenizers_quiet_at_fork():
    """The `tokenizers` library warns in a forked child when the parent used its thread pool, unless
    TOKENIZERS_PARALLELISM is set: set it (to what applies now) for the fork only; the parent's setting is unchanged."""
    given = os.environ.get("TOKENIZERS_PARALLELISM")
    if given is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if given is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _check_answers_match_tokenizer(model, processor, file):
    saved = [list(answer) for answer in model.config.label_answer_token_ids]
    try:
        written = model.set_answer_tokens(processor)
    except ValueError as error:
        raise ModelCheckError(file, first_line(error)) from None
    finally:
        model.config.label_answer_token_ids = saved
    for index, (label, ours, theirs) in enumerate(zip(model.config.labels, saved, written)):
        if ours != theirs:
            raise ModelCheckError(file, f"label_answer_token_ids[{index}] is {ours}, but the tokenizer writes the "
                                        f"answer for label {label!r} as {theirs}")


# ----------------------------------------------------------------------------------------------------------------
# Which model it is
# ----------------------------------------------------------------------------------------------------------------

FINGERPRINT_SAMPLE = 1 << 20  # bytes of tensor data read from each end of a weights file
SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors refuses longer headers


def model_fingerprint(folder):
    """A SHA-256 (hex) of what a model folder predicts with, read in well under a second whatever its size:
    config.json's bytes, and per weights file its name, size, header (every tensor's name, dtype, shape and offsets)
    and the first and last `FINGERPRINT_SAMPLE` bytes of its data (all of a file up to about 100 MB). The same folder
    copied anywhere gives the same value; another training run, another export or a damaged copy gives another
    (`predict --resume` compares it)."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256((folder / CONFIG_FILE).read_bytes())
    index = folder / WEIGHTS_INDEX_FILE
    files = [index] if index.is_file() else []
    files += sorted(folder.glob("*.safetensors"))
    for path in files:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if path == index or size <= 2 * FINGERPRINT_SAMPLE + SAFETENSORS_HEADER_LIMIT:
                digest.update(handle.read())
                continue
            prefix = handle.read(8)
            header = min(int.from_bytes(prefix, "little"), SAFETENSORS_HEADER_LIMIT)
            digest.update(prefix + handle.read(header + FINGERPRINT_SAMPLE))
            handle.seek(-FINGERPRINT_SAMPLE, os.SEEK_END)
            digest.update(handle.read())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------------------------------


def load_checked_bundle(folder, dtype=None, **placed):
    """`(model, processor)` of the EmoVLM-KD bundle in local `folder`, every check of this module passed (the
    config and the weight files before any tensor is read), with the installed classes only. The model is in
    eval mode, on the CPU (`placed`: a quantised load's `quantization_config` and `device_map`)."""
    config = load_checked_config(folder)  # the weight files' headers included: nothing allocated before it passes
    model = load_checked_weights(folder, config, dtype, **placed)
    check_finite(model, _weights_name(folder))
    processor = load_checked_processor(folder)
    check_processor_fits(model, processor, folder)
    return model.eval(), processor


__all__ = [
    "BUNDLE_MODEL_TYPE",
    "check_answer_token_ids",
    "check_chat_template",
    "check_counts",
    "check_finite",
    "check_labels",
    "check_loading_info",
    "check_processor_fits",
    "check_safetensors_file",
    "check_sub_configs",
    "check_weights_fit_config",
    "load_checked_bundle",
    "load_checked_config",
    "load_checked_processor",
    "load_checked_weights",
    "local_model_folder",
    "model_fingerprint",
    "looks_like_path",
    "read_config",
    "register_auto_classes",
    "weight_files",
    "weight_shapes",
]
