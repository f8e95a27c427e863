"""Is a name a local folder or something on the Hub? Decided in seconds, before any heavy import or any work.

    hub = HubAccess()                                  # one per command: the Hub is probed at most once
    hub.dataset_problem("data/FI")                     # None, or one line saying what is wrong and what to do
    hub.model_problem("Qwen/Qwen2-VL-7B-Instruct")

A name that exists here is local. One that does not is tried on the Hub once: with `HF_HUB_OFFLINE=1`, the local
caches are looked at; otherwise one TCP connection to the Hub's endpoint (`CONNECT_TIMEOUT`) says whether it is
reachable, and when it is, one request whether the repo exists. No retries: `huggingface_hub` retries five times
(half a minute) when the network is down, once per file `datasets` looks for. Imports `huggingface_hub` only.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from emovlm_kd.modelcheck import looks_like_path, run_folder_hint

CONNECT_TIMEOUT = 3.0
MODEL_COPY = "download it where the Hub is reachable (`hf download {name} --local-dir DIR`) and pass DIR"
DATASET_WAY_OUT = ("pass the folder that holds the dataset (create it first: download and unpack the dataset there), "
                   "or a Hub dataset id while the Hub is reachable (it is cached for offline runs)")


def connectable(url, timeout=CONNECT_TIMEOUT):
    """Whether a TCP connection to `url`'s host and port opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def could_be_repo_id(name):
    """Whether `name` is shaped like a Hub repo id (`NAME` or `ORG/NAME`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


class HubAccess:
    """The Hub's reachability, probed once (one TCP connection), and the lookups of names through it."""

    def __init__(self):
        from huggingface_hub import constants

        self.endpoint, self.offline = constants.ENDPOINT, constants.HF_HUB_OFFLINE
        self._reachable = None

    @property
    def reachable(self):
        if self._reachable is None:
            self._reachable = not self.offline and connectable(self.endpoint)
        return self._reachable

    @property
    def why_not(self):
        return "HF_HUB_OFFLINE is set" if self.offline else f"the Hub ({self.endpoint}) is unreachable"

    # ------------------------------------------------------------------------------------------------ models

    def model_problem(self, name):
        """None when `name` is a model folder here, in the Hub cache or (reachable) on the Hub; else what is wrong."""
        path = Path(str(name)).expanduser()
        if path.exists():
            if not path.is_dir():
                return "not a folder"
            if not (path / "config.json").is_file():
                return "no config.json in this folder (not a transformers model folder)" + run_folder_hint(path)
            return None
        if looks_like_path(name) or not could_be_repo_id(name):
            return "no such folder"
        return self.hub_model_problem(name)

    def hub_model_problem(self, name):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
        if not self.reachable:
            return f"no such folder, and not in the local Hub cache and {self.why_not}; " + MODEL_COPY.format(name=name)
        return self._exists(name, "model")

    # ---------------------------------------------------------------------------------------------- datasets

    def dataset_problem(self, name):
        """None when `name` is a file or folder here, or a Hub dataset that can be loaded (cached, or on a reachable
        Hub); else what is wrong, naming both the folder and the Hub when it could be either."""
        path = Path(str(name)).expanduser()
        if path.exists():
            return None
        if looks_like_path(name) or not could_be_repo_id(name):
            return "no such folder or file"
        return self.hub_dataset_problem(name)

    def hub_dataset_problem(self, name):
        if self.dataset_cached(name):  # `datasets` loads it from its cache (offline too)
            return None
        datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if datasets_offline or not self.reachable:
            where = Path(str(name)).expanduser().absolute()
            cause = ("HF_HUB_OFFLINE is set" if self.offline else "HF_DATASETS_OFFLINE is set" if datasets_offline
                     else f"no connection to {self.endpoint}")
            return (f"no such folder ({where}) and not reachable on the Hub ({cause}), so it cannot be loaded "
                    f"as a Hub dataset either: {DATASET_WAY_OUT}")
        return self._exists(name, "dataset")

    @staticmethod
    def dataset_cached(name):
        """Whether the Hub cache (`datasets--ORG--NAME`) or the `datasets` cache (`ORG___NAME`) holds `name`."""
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE) / ("datasets--" + str(name).replace("/", "--"))
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return hub_cache.is_dir() or (datasets_cache / str(name).replace("/", "___")).is_dir()

    def _exists(self, name, kind):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        info = HfApi().model_info if kind == "model" else HfApi().dataset_info
        try:
            info(name, timeout=10)
        except GatedRepoError:
            return f"a gated {kind}; accept its terms on the Hub and log in (`hf auth login`)"
        except RepositoryNotFoundError:
            return f"no such folder, nor a {kind} of that name on the Hub"
        except (HfHubHTTPError, OSError) as error:
            way_out = MODEL_COPY.format(name=name) if kind == "model" else DATASET_WAY_OUT
            return f"no such folder, and the Hub did not answer ({error.__class__.__name__}); {way_out}"
        return None
