"""Example images a bundle ships (`examples/<label>.png`: the model card's widget inputs and the demo's examples):
pictures of the synthetic data's generator, one per label, never the dataset's own images (whose licence may not
allow sharing them)."""

import re
import shutil
import tempfile
from pathlib import Path

from emovlm_kd.data.synthetic import make_synthetic_dataset
from emovlm_kd.folders import EXAMPLES_FOLDER, bundle_examples

NUM_WIDGET_EXAMPLES = 4


def widget_example_names(labels, count=NUM_WIDGET_EXAMPLES):
    """`{bundle-relative file name: label}` of the example images for the first `count` labels:
    `examples/<label>.png`, the label made a safe file name (any text can be a label)."""
    names = {}
    for index, label in enumerate(str(label) for label in list(labels)[:count]):
        name = f"{EXAMPLES_FOLDER}/{safe_file_name(label)}.png"
        names[name if name not in names else f"{EXAMPLES_FOLDER}/{safe_file_name(label)}-{index}.png"] = label
    return names


def write_widget_examples(folder, labels, count=NUM_WIDGET_EXAMPLES, seed=0):
    """Example images for the card's widget and the demo: the synthetic generator's picture of each of the first
    `count` labels (`widget_example_names`), written into `folder` (created). Returns `{bundle-relative name: path}`,
    ready for `save_bundle(extra_files=...)`. Same labels and seed, same bytes."""
    labels = [str(label) for label in labels]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory() as tmp:  # class folders by index: a label may be any text ("a/b" too)
        classes = [f"class_{i}" for i in range(len(labels))]
        root = make_synthetic_dataset(Path(tmp) / "synthetic", labels=classes, per_class=(1, 0, 0), image_size=96,
                                      label_noise=0.0, seed=seed)
        for index, name in enumerate(widget_example_names(labels, count)):
            target = folder / Path(name).name
            shutil.copyfile(next((root / "train" / classes[index]).glob("*.png")), target)
            written[name] = target
    return written


def safe_file_name(label):
    """A file name for a label (any text): word characters, '.' and '-' kept, the rest '_'."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "label"


def example_files(model, folder=None):
    """Example images for the demo page: the bundle's own `examples/*.png` when its folder has some, else the same
    seeded synthetic images the export ships (`write_widget_examples`: one per label) written into `folder`
    (default: a new temporary folder)."""
    shipped = bundle_examples(model.name_or_path)
    if shipped:
        return shipped
    folder = Path(folder or tempfile.mkdtemp(prefix="emovlm_kd_examples_"))
    return list(write_widget_examples(folder, model.config.labels).values())
