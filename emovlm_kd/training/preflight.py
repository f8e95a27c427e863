"""Before any expensive work: every input of a training run resolved in seconds, every problem one readable line.

`preflight(cfg)` checks, without downloading a weight or writing a file:
- `--dataset`, `--vlm`, `--teacher` / `--teacher-trained`, a local-VLM `--annotator`: a local folder must exist (a
  path-looking name that does not exist is "no such folder", never a Hub request) and hold a `config.json` (models);
  a Hub name must be in the local cache or, when the Hub is reachable, exist there (one request, no retries);
- `--vlm`: a folder's or cached Hub model's config.json has a backbone `model_type` (qwen2_vl, qwen2_5_vl,
  qwen3_vl);
- `--annotator openai`: its endpoint accepts a connection;
- `--push-to-hub`: a valid repo id, a token, and a reachable Hub whose `whoami` accepts the token;
- `--instructions`: an existing file;
- RUN/model holds no file this project did not write (the export would refuse it hours later).

With no network, Hub names fail once, fast, saying the Hub is unreachable and how to point at a local copy.
"""

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

from emovlm_kd.modelcheck import looks_like_path
from emovlm_kd.training.config import DEMO

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
LOCAL_COPY = ("download it where the Hub is reachable (`hf download {name} --local-dir DIR`) and pass DIR, or set "
              "HF_HUB_OFFLINE=1 with it in the Hub cache")


class PreflightError(ValueError):
    """Every problem found, one per line."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("cannot start the run:\n  " + "\n  ".join(self.problems))


def connectable(url, timeout=CONNECT_TIMEOUT):
    """Whether a TCP connection to `url`'s host and port opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class HubAccess:
    """The Hub's reachability, probed once per preflight (one TCP connection), and lookups through it."""

    def __init__(self):
        from huggingface_hub import constants

        self.endpoint, self.offline = constants.ENDPOINT, constants.HF_HUB_OFFLINE
        self._reachable = None

    @property
    def reachable(self):
        if self._reachable is None:
            self._reachable = not self.offline and connectable(self.endpoint)
        return self._reachable

    def unreachable(self, flag, name):
        why = "HF_HUB_OFFLINE is set" if self.offline else f"the Hub ({self.endpoint}) is unreachable"
        return f"{flag} {name}: not in the local Hub cache and {why}; " + LOCAL_COPY.format(name=name)

    def check_model(self, flag, name):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
        if not self.reachable:
            return self.unreachable(flag, name)
        return self._exists(flag, name, "model")

    def check_dataset(self, flag, name):
        if self.offline:  # `datasets` reads its own cache offline; nothing to probe
            return None
        if not self.reachable:
            return self.unreachable(flag, name)
        return self._exists(flag, name, "dataset")

    def _exists(self, flag, name, kind):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        info = HfApi().model_info if kind == "model" else HfApi().dataset_info
        try:
            info(name, timeout=10)
        except GatedRepoError:
            return f"{flag} {name}: a gated {kind}; accept its terms on the Hub and log in (`hf auth login`)"
        except RepositoryNotFoundError:
            return f"{flag} {name}: no such {kind} on the Hub (nor a local folder)"
        except (HfHubHTTPError, OSError) as error:
            return f"{flag} {name}: the Hub did not answer ({error.__class__.__name__}); " + LOCAL_COPY.format(name=name)
        return None


def check_model_reference(flag, name, hub):
    """One problem line for a model given by folder or Hub name, or None."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{flag} {name}: not a folder"
        if not (path / "config.json").is_file():
            return f"{flag} {name}: no config.json in this folder (not a transformers model folder)"
        return None
    if looks_like_path(name):
        return f"{flag} {name}: no such folder"
    return hub.check_model(flag, name)


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
    path = Path(name).expanduser()
    if path.exists():
        return None
    if looks_like_path(name) or "/" not in name:
        return f"--dataset {name}: no such folder or file"
    return hub.check_dataset("--dataset", name)


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
    from emovlm_kd.hub import foreign_files

    model_dir = Path(cfg.output_dir) / "model"
    foreign = foreign_files(model_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        return (f"--output-dir {cfg.output_dir}: {model_dir} holds files this project did not write ({shown}); "
                "choose another --output-dir or move them")
    return None


def problems(cfg):
    """Every problem with the run's inputs (a list of lines; empty when the run can start)."""
    hub = HubAccess()
    found = []
    if cfg.dataset != DEMO:
        found.append(check_dataset_reference(cfg.dataset, hub))
    if not cfg.is_demo:
        found.append(check_model_reference("--vlm", cfg.vlm, hub) or check_vlm_backbone(cfg.vlm))
    if cfg.teacher_trained:
        found.append(check_model_reference("--teacher-trained", cfg.teacher_trained, hub))
    elif cfg.teacher != DEMO:
        found.append(check_model_reference("--teacher", cfg.teacher, hub))
    if cfg.instructions and cfg.instructions != DEMO and not Path(cfg.instructions).is_file():
        found.append(f"--instructions {cfg.instructions}: no such file")
    found.append(check_annotator(cfg, hub))
    if cfg.push_to_hub:
        found.append(check_push(cfg.push_to_hub, hub))
    found.append(check_output(cfg))
    return [problem for problem in found if problem]


def preflight(cfg):
    """Raise `PreflightError` listing every problem; log one line when all is well."""
    found = problems(cfg)
    if found:
        raise PreflightError(found)
    logger.info("preflight: inputs resolved (dataset %s, VLM %s, teacher %s)", cfg.dataset, cfg.vlm,
                cfg.teacher_trained or cfg.teacher)


__all__ = ["PreflightError", "looks_like_path", "preflight", "problems"]
