"""Shared fixtures: everything offline, seeded and tiny."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")  # what `--help`, a refusal and a plain import must not wait for
IMPORTED = "modules imported: "  # the line of `imported_by_a_child`'s report


def imported_by_a_child(code, modules=HEAVY, then="", args=(), env=None):
    """`(imported, result)`: which of `modules` (sorted) a fresh Python, run in the checkout, holds in `sys.modules`
    after running `code` (with `args` as its `sys.argv[1:]`, `env` added to this environment), and its completed
    process; `then` runs after that check. The child must exit 0."""
    report = f"\nimport json as _json, sys as _sys\nprint({IMPORTED!r} + _json.dumps(sorted(set({list(modules)!r}) & " \
             "set(_sys.modules))))\n"
    result = subprocess.run([sys.executable, "-c", code + report + then, *map(str, args)], cwd=REPO,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(IMPORTED)]
    return json.loads(line[len(IMPORTED):]), result


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


class CallCounter:
    """Counts the calls of a module through a forward hook (e.g. the visual encoder, the language model) and, for a
    visual encoder (called with `grid_thw`, one row per image), the images it encoded over all calls."""

    def __init__(self, module):
        self.calls = 0
        self.images = 0
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls += 1
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is not None:
            self.images += grid_thw.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def brute_force_log_likelihoods(model, inputs):
    """Per label: a separate full forward of prompt + answer with pixels; sum of the answer tokens' log-probs."""
    results = []
    for answer in model.config.label_answer_token_ids:
        answer = torch.tensor([answer])
        ids = torch.cat([inputs["input_ids"], answer], 1)
        types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
        out = model.vlm(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=types,
        )
        n = answer.shape[1]
        log_probs = out.logits[0, -n - 1 : -1].float().log_softmax(-1)
        results.append(log_probs[torch.arange(n), answer[0]].sum())
    return torch.stack(results)


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


BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # configuration_emovlm_kd.SUPPORTED_BACKBONES (test_backbones checks)


@pytest.fixture(scope="session", params=BACKBONES)
def backbone(request):
    """Each backbone `model_type` the model supports, in turn (tests that take it run once per backbone)."""
    return request.param


@pytest.fixture(scope="session")
def backbone_bundle(request, backbone):
    """(model, processor): `tiny_bundle` itself for Qwen2-VL, the same tiny bundle on Qwen2.5-VL / Qwen3-VL."""
    from emovlm_kd.tiny import build_tiny_bundle

    return request.getfixturevalue("tiny_bundle") if backbone == "qwen2_vl" else build_tiny_bundle(backbone=backbone)


@pytest.fixture(scope="session")
def backbone_bundle_dir(request, tmp_path_factory, backbone, backbone_bundle):
    """`backbone_bundle` saved as a Hub folder (`tiny_bundle_dir` for Qwen2-VL)."""
    from emovlm_kd.hub import save_bundle

    if backbone == "qwen2_vl":
        return request.getfixturevalue("tiny_bundle_dir")
    model, processor = backbone_bundle
    return save_bundle(model, processor, tmp_path_factory.mktemp(f"bundle-{backbone}") / "model")


@pytest.fixture
def images():
    """Three images of different sizes and aspect ratios."""
    return [random_image(60, 80, 1), random_image(120, 100, 2), random_image(56, 56, 3)]


def tiny_settings(data, vlm, teacher, out, **extra):
    """TrainConfig of a tiny run (seconds on a CPU) over `tiny_inputs`."""
    from emovlm_kd.training.config import TrainConfig

    values = dict(
        dataset=str(data), vlm=str(vlm), teacher=str(teacher), output_dir=str(out), head_hidden_sizes=[32],
        sft_epochs=2.0, sft_lr=2e-3, sft_batch_size=8, teacher_epochs=2.0, teacher_lr=2e-3, teacher_batch_size=16,
        distill_epochs=10.0, distill_lr=3e-3, gate_epochs=10.0, gate_lr=1e-2, batch_size=16, seed=0,
        instruction_kinds=["categorical"],  # no conversation/reasoning answers offline (tests that have some say so)
    )
    values.update(extra)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """A small synthetic dataset and tiny base models saved like Hub checkpoints: (data, vlm, teacher) paths."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_teacher, build_tiny_vlm

    root = tmp_path_factory.mktemp("inputs")
    data = make_synthetic_dataset(root / "data", per_class=(4, 1, 2))
    processor = build_tiny_processor()
    build_tiny_vlm(processor.tokenizer).save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    build_tiny_teacher(root / "teacher", seed=0)
    return data, root / "vlm", root / "teacher"
