"""The shipped training settings: the demo and one YAML file per paper dataset.

Installed as `emovlm_kd.configs` (setup.py maps this folder there), so `emovlm-kd train --config fi` finds them
from a wheel too. `path("fi")` is the file `fi.yaml`; `names()` lists them.
"""

from importlib import resources


def names():
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def path(name):
    """The shipped config `name` (`fi`, `fi.yaml` or `configs/fi.yaml`), or None when there is none."""
    stem = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem[: -len(".yaml")] if stem.endswith(".yaml") else stem
    candidate = resources.files(__name__) / f"{stem}.yaml"
    return candidate if candidate.is_file() else None
