"""What the gate trains on (`--gate-data`): sampled answers (the paper's protocol) generated once, cached and cycled
over the epochs; held-out val answers; deterministic train answers; and `emovlm-kd ablate gate-data`."""

import json

import pytest
import torch
from conftest import random_image, tiny_settings

from emovlm_kd.cli import main
from emovlm_kd.training.config import TrainConfig
from emovlm_kd.training.gatedata import CycledSamples, SeededSampling, sample_answers

# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def test_seeded_sampling_draws_from_the_tempered_distribution():
    """Greedy decoding over the processor's scores is a draw from softmax(logits / T) (the Gumbel-max trick)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 6000
    for temperature in (0.8, 2.0):
        scores = SeededSampling(range(rows), temperature)(torch.zeros(rows, 5, dtype=torch.long), logits.repeat(rows, 1))
        frequencies = torch.bincount(scores.argmax(-1), minlength=4).float() / rows
        expected = torch.softmax(logits / temperature, -1)
        assert torch.allclose(frequencies, expected, atol=4 * (0.25 / rows) ** 0.5), (temperature, frequencies)
    cold = SeededSampling(range(50), 1e-4)(torch.zeros(50, 5, dtype=torch.long), logits.repeat(50, 1))
    assert (cold.argmax(-1) == 0).all()  # T -> 0: greedy


def test_each_rows_noise_depends_on_its_seed_and_step_only():
    scores = torch.zeros(3, 10)
    first = SeededSampling([7, 8, 9], 1.0)
    a = first(torch.zeros(3, 4, dtype=torch.long), scores)
    b = first(torch.zeros(3, 5, dtype=torch.long), scores)  # the next step: new noise
    alone = SeededSampling([8], 1.0)(torch.zeros(1, 11, dtype=torch.long), scores[:1])  # another prompt length
    assert torch.equal(a[1], alone[0]) and not torch.equal(a, b)


def test_sampled_answers_do_not_depend_on_the_batch_and_ignore_the_checkpoints_top_k(tiny_bundle):
    """Qwen2-VL-Instruct's generation config has top_k 1 (greedy in disguise); the sampler is pure temperature
    sampling whatever the checkpoint's generation config says, and each answer is the same in any batch."""
    from transformers import LogitsProcessorList

    from pipeline_emovlm_kd import prepare_inputs

    model, processor = tiny_bundle
    model.vlm.generation_config.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.01)
    images = [random_image(40, 56, 1), random_image(64, 48, 2)]
    rows = [image for image in images for _ in range(3)]
    vectors, found = sample_answers(model, processor, rows, range(6), 0.8)
    alone, alone_found = sample_answers(model, processor, rows[3:], range(3, 6), 0.8)
    assert torch.equal(vectors[3:], alone) and torch.equal(found[3:], alone_found)
    inputs = prepare_inputs(processor, model.config, [images[0]] * 4)
    texts = model.generate_labels(**inputs, tokenizer=processor.tokenizer, generation_kwargs={
        "do_sample": False, "logits_processor": LogitsProcessorList([SeededSampling(range(4), 0.8)])}).generated_text
    assert len(set(texts)) > 1  # four seeds, four draws: not one greedy answer


# ---------------------------------------------------------------------------------------------------------------
# Cycling over the epochs
# ---------------------------------------------------------------------------------------------------------------


def test_the_gate_trains_on_sample_epoch_mod_k(tmp_path, monkeypatch):
    from emovlm_kd.training import heads, trainers
    from modeling_emovlm_kd import GATE_CLASSES

    n, k, c = 8, 3, 4
    samples = torch.nn.functional.one_hot(torch.arange(k), c).float().expand(n, k, c).clone()  # sample j says j
    seen = []
    compute_loss = trainers.GateTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append((int(self.state.epoch + 1e-6), set(inputs["vlm_scores"].argmax(-1).tolist())))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainers.GateTrainer, "compute_loss", recording)
    cfg = TrainConfig(gate_epochs=5.0, gate_batch_size=4, gate_lr=1e-2, seed=0)
    heads.train_gate(cfg.gate_args, GATE_CLASSES["concat_linear"](c), samples, torch.full((n, c), 1 / c),
                     torch.zeros(n, dtype=torch.long), tmp_path, seed=cfg.seed, save_strategy="no", disable_tqdm=True)
    assert [epoch for epoch, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(answers == {epoch % k} for epoch, answers in seen)


def test_cycled_samples_rows():
    rows = CycledSamples(torch.arange(12.0).view(2, 3, 2), torch.ones(2, 2), torch.tensor([0, 1]))
    rows.epoch = 4  # sample 4 % 3 = 1
    assert len(rows) == 2 and rows[1]["vlm_scores"].tolist() == [8.0, 9.0] and rows[1]["labels"] == 1
    with pytest.raises(ValueError, match="rows differ"):
        CycledSamples(torch.zeros(2, 3, 2), torch.zeros(3, 2), torch.zeros(2))


def test_gate_data_settings():
    assert TrainConfig(gate_train_split="val").gate_data == "val"  # the old name still works
    assert TrainConfig(vlm_vector="onehot", gate_data="sampled").gate_samples == 10
    with pytest.raises(ValueError, match="--gate-data sampled .* --vlm-vector onehot"):
        TrainConfig(gate_data="sampled")  # sampled answers are one-hot: the gate must see one-hot vectors at test
    with pytest.raises(ValueError, match="--gate-samples"):
        TrainConfig(vlm_vector="onehot", gate_data="sampled", gate_samples=0)


# ---------------------------------------------------------------------------------------------------------------
# A run with sampled gate data, and the comparison
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_run(tiny_inputs, tmp_path_factory):
    from emovlm_kd.training.runner import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny_settings(*tiny_inputs, out, vlm_vector="onehot", gate_data="sampled", gate_samples=3)
    return cfg, out, run_training(cfg)


def test_the_sampled_answers_are_cached_once_and_the_run_says_what_the_gate_saw(sampled_run, caplog):
    from safetensors.torch import load_file

    from emovlm_kd.training.runner import run_training

    cfg, out, results = sampled_run
    (cache,) = (out / "cache").glob("gate_samples-train-*.safetensors")
    tensors = load_file(cache)
    assert tensors["vlm_samples"].shape == (32, 3, 8) and tensors["answer_found"].shape == (32, 3)
    assert set(tensors["vlm_samples"].sum(-1).unique().tolist()) <= {0.0, 1.0}  # one-hot, or zeros: no label named
    assert results["gate_data"] == {"protocol": "sampled", "split": "train", "images": 32, "samples_per_image": 3,
                                    "temperature": 0.8,
                                    "answers_naming_a_label": round(float(tensors["answer_found"].float().mean()), 4)}
    assert json.loads((out / "eval_results.json").read_text()) == results
    assert "3 answers per train image sampled" in (out / "model" / "README.md").read_text().replace("\n", " ")
    with caplog.at_level("INFO"):
        assert run_training(cfg) == results
    assert f"cache hit: {cache.name}" in caplog.text
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 5


def test_the_ablation_retrains_the_runs_sampled_gate_exactly(sampled_run):
    from safetensors.torch import load_file

    from emovlm_kd.evaluation.ablations import (
        fit_gate,
        load_run_head,
        load_run_tensors,
        load_settings,
    )

    _, run_dir, _ = sampled_run
    run_cfg, cfg = load_settings(run_dir, {})
    data = load_run_tensors(run_dir, run_cfg)
    assert data.gate_samples.shape == (32, 3, 8)
    _, head_logits = load_run_head(run_dir, run_cfg, data)
    gate, _ = fit_gate(cfg, data, head_logits)
    for name, tensor in load_file(run_dir / "stage4_gate" / "gate.safetensors").items():
        assert torch.equal(gate.state_dict()[name], tensor), name


def test_ablate_gate_data_prints_the_protocols_side_by_side(sampled_run, tmp_path, capsys, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("the ablation loaded a model")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    _, run_dir, results = sampled_run
    assert main(["ablate", "gate-data", "--run", str(run_dir), "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "gate_data.json").read_text())
    assert [row["gate_data"] for row in table["rows"]] == ["sampled", "val", "train"]
    assert [row["run_setting"] for row in table["rows"]] == [True, False, False]
    sampled, val, train = table["rows"]
    assert (sampled["images"], sampled["samples_per_image"], val["images"], train["images"]) == (32, 3, 8, 32)
    assert sampled["accuracy"]["emovlm_kd"] == results["accuracy"]["emovlm_kd"] and table["reproduces_run"] is True
    for row in table["rows"]:
        assert 0.0 <= row["vlm_accuracy_on_gate_data"] <= 1.0 and 0.0 <= row["accuracy"]["emovlm_kd"] <= 1.0
    assert "| Gate data | Trained on | VLM right there | EmoVLM-KD |" in printed
    assert "| sampled (the paper's) (run) | 32 train images x 3 answers |" in printed
    assert "| val (held out) | 8 val images |" in printed and "| train | 32 train images |" in printed
    assert printed.startswith((tmp_path / "gate_data.md").read_text())


def test_ablate_gate_data_with_fewer_or_more_samples_than_cached(sampled_run, tmp_path):
    _, run_dir, _ = sampled_run
    assert main(["ablate", "gate-data", "--run", str(run_dir), "--output-dir", str(tmp_path / "a"),
                 "--protocols", "sampled", "--gate-samples", "2"]) == 0
    row = json.loads((tmp_path / "a" / "gate_data.json").read_text())["rows"][0]
    assert row["samples_per_image"] == 2 and row["run_setting"] is False
    assert main(["ablate", "gate-data", "--run", str(run_dir), "--output-dir", str(tmp_path / "b"),
                 "--protocols", "sampled,val", "--gate-samples", "5"]) == 0
    table = json.loads((tmp_path / "b" / "gate_data.json").read_text())
    assert "the run cached 3 sampled answers per image" in table["rows"][0]["unavailable"]
    assert "accuracy" in table["rows"][1]
    assert "sampled (the paper's): not available" in (tmp_path / "b" / "gate_data.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "gate-data", "--run", str(run_dir), "--protocols", "copy"])
    assert exit_info.value.code == 2
