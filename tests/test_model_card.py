"""The model card's metadata holds Hub ids only, inherits the base model's license, tags the actual backbone and
names the pushed repo in its usage snippet (issue 13 item 7). No training: `model_card` on hand-made settings."""

from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from emovlm_kd.training.modelcard import (backbone_tag, hub_id_of, model_card, widget_example_names,
                                         write_widget_examples)

RESULTS = {"split": "test", "num_samples": 8,
           "accuracy": {"vlm": 0.5, "distill": 0.625, "teacher": 0.75, "emovlm_kd": 0.875}}


def settings(**values):
    base = dict(dataset="demo", vlm="demo", teacher="demo", teacher_trained=None, gate_type="mlp", head_hidden_sizes=[8],
                alpha=0.5, tau=2.0, sft_lr=1e-4, lora_r=8, lora_alpha=16, lora_targets="all-linear", distill_lr=1e-3,
                gate_lr=1e-3, seed=0, teacher_optimizer="adam", teacher_lr=1e-4, teacher_weight_decay=1e-4,
                teacher_batch_size=8, teacher_epochs=1, teacher_scheduler="constant", push_to_hub=None, license=None)
    base.update(values)
    return SimpleNamespace(**base)


def card_of(cfg, base_model, **kwargs):
    return ModelCard(str(model_card(cfg, ["amusement", "anger"], RESULTS, base_model, **kwargs)))


def local_base(tmp_path, card_text=None, name="vlm"):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if card_text is not None:
        (folder / "README.md").write_text(card_text)
    return folder


def test_a_local_base_model_is_not_published_as_a_path_and_its_license_is_inherited(tmp_path):
    base = local_base(tmp_path, "---\nlicense: apache-2.0\nbase_model: Qwen/Qwen2-VL-7B-Instruct\n---\n# a copy\n")
    data_dir = tmp_path / "data" / "FI"
    data_dir.mkdir(parents=True)
    card = card_of(settings(vlm=str(base), dataset=str(data_dir)), base)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "Qwen/Qwen2-VL-7B-Instruct"
    assert card.data.datasets is None  # a local folder is not a Hub dataset
    assert str(tmp_path) not in str(card)


def test_a_hub_cache_snapshot_stands_for_its_hub_id(tmp_path):
    base = local_base(tmp_path, None, name="hub/models--Qwen--Qwen2-VL-2B-Instruct/snapshots/0123abc")
    card = card_of(settings(vlm=str(base), license="mit"), base)
    assert card.data.base_model == "Qwen/Qwen2-VL-2B-Instruct"
    assert card.data.license == "mit"  # --license wins over any inherited one


def test_an_unreadable_license_is_left_out_with_a_warning(tmp_path, caplog):
    base = local_base(tmp_path, None)
    with caplog.at_level("WARNING"):
        card = card_of(settings(vlm=str(base)), base)
    assert card.data.license is None and card.data.base_model is None
    assert "no license" in caplog.text


def test_tags_follow_the_backbone_and_the_snippet_names_the_pushed_repo(tmp_path):
    card = card_of(settings(push_to_hub="me/emovlm-kd-fi"), tmp_path / "demo-vlm", backbone_type="qwen2_5_vl")
    assert "qwen2.5-vl" in card.data.tags and "qwen2-vl" not in card.data.tags
    assert 'pipeline(model="me/emovlm-kd-fi"' in card.text
    assert "THIS_FOLDER_OR_REPO" not in card.text
    assert card.data.eval_results and {r.metric_value for r in card.data.eval_results} == {50.0, 62.5, 87.5}


def test_a_hub_dataset_id_is_listed(tmp_path):
    card = card_of(settings(dataset="someone/emoset"), tmp_path / "demo-vlm")
    assert card.data.datasets == ["someone/emoset"]


@pytest.mark.parametrize("model_type, tag", [("qwen2_vl", "qwen2-vl"), ("qwen2_5_vl", "qwen2.5-vl"),
                                             ("qwen3_vl", "qwen3-vl")])
def test_backbone_tags(model_type, tag):
    assert backbone_tag(model_type) == tag


def test_hub_ids_are_recognised_and_paths_that_exist_are_not_ids(tmp_path):
    assert hub_id_of("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"
    assert hub_id_of(str(local_base(tmp_path, None))) is None


def test_a_hub_base_model_without_network_is_not_asked_for_its_card(tmp_path, monkeypatch):
    """One connection probe, no download attempt (and its retries) when the Hub is unreachable."""
    import huggingface_hub

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda *a, **k: pytest.fail("downloaded")))
    card = card_of(settings(vlm="Qwen/Qwen2-VL-7B-Instruct"), "Qwen/Qwen2-VL-7B-Instruct")
    assert card.data.license is None and card.data.base_model == "Qwen/Qwen2-VL-7B-Instruct"


def test_the_widget_lists_the_example_images_and_the_text_the_demo_command(tmp_path):
    labels = ["amusement", "anger", "a/b", "don't care", "fear"]
    names = widget_example_names(labels)  # the first NUM_WIDGET_EXAMPLES labels, safe file names
    assert names == {"examples/amusement.png": "amusement", "examples/anger.png": "anger",
                     "examples/a_b.png": "a/b", "examples/don_t_care.png": "don't care"}
    written = write_widget_examples(tmp_path / "examples", labels)
    assert list(written) == list(names)
    for path in written.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 56
    pushed = card_of(settings(push_to_hub="me/emovlm-kd-fi"), tmp_path / "demo-vlm", examples=names)
    assert pushed.data.pipeline_tag == "image-classification"
    assert pushed.data.widget[0] == {"src": "https://huggingface.co/me/emovlm-kd-fi/resolve/main/examples/amusement.png",
                                     "example_title": "amusement"}
    assert [entry["src"].rsplit("/main/", 1)[1] for entry in pushed.data.widget] == list(names)
    assert [entry["example_title"] for entry in pushed.data.widget] == labels[:4]
    assert "emovlm-kd demo --model me/emovlm-kd-fi" in pushed.text
    local = card_of(settings(), tmp_path / "demo-vlm", examples=list(names))
    assert [entry["src"] for entry in local.data.widget] == list(names)  # relative: no repo id to resolve
    assert "emovlm-kd demo --model THIS_FOLDER_OR_REPO" in local.text
    assert card_of(settings(), tmp_path / "demo-vlm").data.to_dict().get("widget") is None  # no examples, no widget


def test_the_example_images_are_the_same_bytes_each_time(tmp_path):
    first = write_widget_examples(tmp_path / "one", ["amusement", "anger"])
    second = write_widget_examples(tmp_path / "two", ["amusement", "anger"])
    assert [p.read_bytes() for p in first.values()] == [p.read_bytes() for p in second.values()]
    assert first["examples/amusement.png"].read_bytes() != first["examples/anger.png"].read_bytes()
