"""Before any expensive work: every input of a training run resolved, every problem one readable line, all at once.

`preflight(cfg)` checks, without downloading a weight or writing a file, and reports every problem in one round:
- the instruction mix: conversation/reasoning answers come from somewhere (`config.instruction_source_problems`),
  and an `--instructions` file's every row has the right shape (`instructions.instruction_file_problem`);
- `--dataset`, `--vlm`, `--teacher` / `--teacher-trained`, a local-VLM `--annotator`: a local folder must exist (a
  path-looking name that does not exist is "no such folder", never a Hub request) and hold a `config.json` (models;
  a run folder given for a model is pointed to its `model/`); any other name must be in the local cache or, when
  the Hub is reachable, exist there (`emovlm_kd.hubaccess`: one probe, one request, no retries);
- `--vlm`: a folder's or cached Hub model's config.json has a backbone `model_type` (qwen2_vl, qwen2_5_vl,
  qwen3_vl);
- `--annotator openai`: its endpoint accepts a connection;
- `--push-to-hub`: a valid repo id, a token, and a reachable Hub whose `whoami` accepts the token;
- RUN/model holds no file this project did not write (the export would refuse it hours later);
- then a local `--dataset` is read (`read_dataset`: its layout, labels and splits, every image file opened once),
  so that a folder without labels or without a test split stops the run before anything is written. The
  dataset read is returned and the run uses it (it is not read twice).

With no network, Hub names fail once, fast, saying the Hub is unreachable and how to point at a local copy.
"""

import logging
from pathlib import Path

from emovlm_kd.errors import InputError, few
from emovlm_kd.hubaccess import CONNECT_TIMEOUT, HubAccess, connectable
from emovlm_kd.modelcheck import looks_like_path
from emovlm_kd.training.config import DEMO, instruction_source_problems

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """Every problem found, one per line."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("cannot start the run:\n  " + "\n  ".join(self.problems))


def check_model_reference(flag, name, hub):
    """One problem line for a model given by folder or Hub name, or None."""
    problem = hub.model_problem(name)
    return f"{flag} {name}: {problem}" if problem else None


def check_vlm_backbone(name):
    """One problem line when a local or cached `--vlm` is not a supported backbone (its config.json's `model_type`),
    or None; a Hub name not in the cache is not downloaded for this (stage 1 then says what it loaded)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    from configuration_emovlm_kd import SUPPORTED_BACKBONES

    path = Path(name).expanduser()
    config = path / "config.json" if path.is_dir() else try_to_load_from_cache(name, "config.json")
    if not isinstance(config, (str, Path)) or not Path(config).is_file():
        return None
    try:
        model_type = json.loads(Path(config).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return f"--vlm {name}: config.json is not a JSON object"
    if model_type not in SUPPORTED_BACKBONES:
        return (f"--vlm {name}: model_type {model_type!r} is not a backbone EmoVLM-KD drives "
                f"({', '.join(SUPPORTED_BACKBONES)}: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    return None


def check_dataset_reference(name, hub):
    problem = hub.dataset_problem(name)
    return f"--dataset {name}: {problem}" if problem else None


def is_local(name):
    return Path(str(name)).expanduser().exists()


def read_dataset(cfg, source=None):
    """The run's `DatasetDict` from `source` (default `--dataset`) as `load_image_dataset` reads it (every local image
    opened once), with the `--splits` file applied; `InputError` (a `ValueError`) when the dataset or the split file
    does not read, has no train or test split, or (with `--leakage error`) when identical images sit in two splits
    (a warning otherwise)."""
    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.data.splitfile import apply_splits, check_leakage, read_splits
    from emovlm_kd.settings import dataset_options

    source = cfg.dataset if source is None else source
    try:
        dataset = load_image_dataset(source, **dataset_options(cfg))
        if cfg.splits:
            dataset = apply_splits(dataset, read_splits(cfg.splits), where=cfg.splits)
        for split in ("train", "test"):
            if split not in dataset:
                raise ValueError(f"dataset {source!r} has no {split} split (found: {', '.join(dataset)})")
        check_leakage(dataset, strict=cfg.leakage == "error")
    except ValueError as error:
        if type(error) is not ValueError:  # its own type kept (`SplitMismatchError` is an `InputError` already)
            raise
        raise InputError(str(error)) from error  # the readers' and the split file's checks: the user's data
    return dataset


def check_annotator(cfg, hub):
    if not cfg.annotator:
        return None
    if cfg.annotator != "openai":
        return check_model_reference("--annotator", cfg.annotator, hub)
    if not cfg.annotator_url or not cfg.annotator_model:
        return "--annotator openai needs --annotator-url and --annotator-model"
    if not connectable(cfg.annotator_url):
        return f"--annotator-url {cfg.annotator_url}: no connection within {CONNECT_TIMEOUT:.0f} s"
    return None


def check_push(repo_id, hub):
    from huggingface_hub import get_token, whoami
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return f"--push-to-hub {repo_id}: {error}"
    if get_token() is None:
        return f"--push-to-hub {repo_id}: no Hub token; log in (`hf auth login`) or set HF_TOKEN"
    if not hub.reachable:
        return f"--push-to-hub {repo_id}: " + ("HF_HUB_OFFLINE is set" if hub.offline else
                                               f"the Hub ({hub.endpoint}) is unreachable")
    try:
        whoami()
    except Exception as error:  # an expired or revoked token, or the Hub refusing it
        return f"--push-to-hub {repo_id}: the Hub refused the token ({error.__class__.__name__})"
    return None


def check_output(cfg):
    from emovlm_kd.folders import bundle_conflicts

    model_dir = Path(cfg.output_dir) / "model"
    foreign = bundle_conflicts(model_dir)
    if foreign:
        return (f"--output-dir {cfg.output_dir}: {model_dir} holds files this project did not write "
                f"({few(foreign)}); choose another --output-dir or move them")
    return None


def problems(cfg):
    """Every problem with the run's inputs but the dataset's contents (a list of lines; empty when all resolve)."""
    hub = HubAccess()
    found = instruction_source_problems(cfg.instruction_kinds, cfg.instructions, cfg.annotator, cfg.dataset)
    if cfg.instructions and cfg.instructions != DEMO and Path(cfg.instructions).is_file():
        from emovlm_kd.training.instructions import instruction_file_problem  # every line's shape, file:line

        found.append(f"--instructions {problem}" if (problem := instruction_file_problem(cfg.instructions)) else None)
    if cfg.dataset != DEMO:
        found.append(check_dataset_reference(cfg.dataset, hub))
    if not cfg.is_demo:
        found.append(check_model_reference("--vlm", cfg.vlm, hub) or check_vlm_backbone(cfg.vlm))
    if cfg.teacher_trained:
        found.append(check_model_reference("--teacher-trained", cfg.teacher_trained, hub))
    elif cfg.teacher != DEMO:
        found.append(check_model_reference("--teacher", cfg.teacher, hub))
    found.append(check_annotator(cfg, hub))
    if cfg.splits and not Path(cfg.splits).is_file():
        found.append(f"--splits {cfg.splits}: no such file")
    if cfg.push_to_hub:
        found.append(check_push(cfg.push_to_hub, hub))
    found.append(check_output(cfg))
    return [problem for problem in found if problem]


def preflight(cfg):
    """Raise `PreflightError` listing every problem; else the dataset read (a local `--dataset`: see `read_dataset`)
    or None (the demo's, built in the run, or a Hub dataset, loaded by the run), with one log line.

    A local dataset is read also when other problems were found, so that its own come in the same round."""
    found = problems(cfg)
    dataset = None
    if cfg.dataset != DEMO and is_local(cfg.dataset):
        try:
            dataset = read_dataset(cfg)
        except (ValueError, OSError) as error:
            found.append(f"--dataset {cfg.dataset}: {error}")
    if found:
        raise PreflightError(found)
    logger.info("preflight: inputs resolved (dataset %s, VLM %s, teacher %s)", cfg.dataset, cfg.vlm,
                cfg.teacher_trained or cfg.teacher)
    return dataset


__all__ = ["CONNECT_TIMEOUT", "HubAccess", "PreflightError", "connectable", "looks_like_path", "preflight", "problems",
           "read_dataset"]
