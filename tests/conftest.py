"""Shared fixtures: everything offline, seeded and tiny."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tiny_bundle():
    from emovlm_kd.tiny import build_tiny_bundle

    return build_tiny_bundle()


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_bundle):
    from emovlm_kd.hub import save_bundle

    model, processor = tiny_bundle
    return save_bundle(model, processor, tmp_path_factory.mktemp("bundle") / "model")


@pytest.fixture
def images():
    """Three images of different sizes and aspect ratios."""
    return [random_image(60, 80, 1), random_image(120, 100, 2), random_image(56, 56, 3)]
