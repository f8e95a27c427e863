"""`emovlm-kd ablate`: head depth (Table 3), alpha (Figure 3) and gate (Table 4) on a tiny run's caches."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_settings

from emovlm_kd.cli import main

# ---------------------------------------------------------------------------------------------------------------
# A tiny finished run (as tests/test_train.py builds it)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_inputs, tmp_path_factory):
    """A finished run whose gate trains on val (the path the demo takes), with its eval_results.json."""
    from emovlm_kd.training.runner import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny_settings(*tiny_inputs, out, gate_train_split="val")
    results = run_training(cfg)
    return cfg, out, results


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to load a model or processor, to run the bundle, or to read weights other than the run's caches
    and its stage 3 head fails the test."""
    import safetensors.torch
    import transformers

    import emovlm_kd.inference

    def forbidden(*args, **kwargs):
        raise AssertionError("an ablation loaded or ran a model")

    for name in ("AutoModelForImageTextToText", "AutoModelForImageClassification", "AutoProcessor",
                 "AutoImageProcessor"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    monkeypatch.setattr(emovlm_kd.inference, "run_batch", forbidden)
    load_file = safetensors.torch.load_file

    def only_caches(path, *args, **kwargs):
        assert Path(path).parent.name == "cache" or Path(path).name == "head.safetensors", path
        return load_file(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", only_caches)


def ablate(run_dir, out_dir, *args):
    """Run `emovlm-kd ablate ...`; (the JSON table, the Markdown, seconds)."""
    started = time.perf_counter()
    assert main(["ablate", *args, "--run", str(run_dir), "--output-dir", str(out_dir)]) == 0
    seconds = time.perf_counter() - started
    name = {"head-depth": "head_depth"}.get(args[0], args[0])
    table = json.loads((out_dir / f"{name}.json").read_text())
    return table, (out_dir / f"{name}.md").read_text(), seconds


def files_of(run_dir):
    """{RUN-relative path: mtime} of the run's files, but RUN/.lock (ablate holds the run lock: its holder line)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}


# ---------------------------------------------------------------------------------------------------------------
# The three ablations
# ---------------------------------------------------------------------------------------------------------------


def test_head_depth_table(trained_run, tmp_path, no_models, capsys):
    cfg, run_dir, results = trained_run
    before = files_of(run_dir)
    table, markdown, seconds = ablate(run_dir, tmp_path, "head-depth", "--depths", "32;64,32;1024")
    assert seconds < 30
    assert files_of(run_dir) == before  # nothing written into the run (no checkpoints, no stage markers)
    assert table["ablation"] == "head_depth" and table["num_samples"] == results["num_samples"] == 16
    assert [row["head_hidden_sizes"] for row in table["rows"]] == [[32], [64, 32], [1024]]
    assert [row["run_setting"] for row in table["rows"]] == [True, False, False]
    hidden, classes = 64, 8  # the tiny VLM's hidden size, the Mikels labels
    assert [row["head_parameters"] for row in table["rows"]] == [
        hidden * 32 + 32 + 32 * classes + classes,
        hidden * 64 + 64 + 64 * 32 + 32 + 32 * classes + classes,
        hidden * 1024 + 1024 + 1024 * classes + classes,
    ]
    for row in table["rows"]:
        assert set(row["accuracy"]) == {"distill", "emovlm_kd"}
        assert all(0.0 <= value <= 1.0 for value in row["accuracy"].values())
    own = table["rows"][0]["accuracy"]
    assert own == {"distill": results["accuracy"]["distill"], "emovlm_kd": results["accuracy"]["emovlm_kd"]}
    assert table["reproduces_run"] is True
    assert table["branches"] == {"vlm": results["accuracy"]["vlm"], "teacher": results["accuracy"]["teacher"]}
    assert table["settings"]["gate_train_split"] == "val" and table["settings"]["alpha"] == cfg.alpha
    assert table["rows"][0]["paper"] is None and table["rows"][2]["paper"] == {"fi": 79.51, "emotion6": 73.91}
    assert "| [32] (run) |" in markdown and "| Head | Head parameters | Distill head | EmoVLM-KD | Paper FI |" in markdown
    assert "| 79.51 | 73.91 |" in markdown and "reproduced by the (run) row: yes" in markdown
    assert markdown in capsys.readouterr().out


def test_alpha_table_with_kl_to_the_teacher(trained_run, tmp_path, no_models):
    cfg, run_dir, results = trained_run
    table, markdown, seconds = ablate(run_dir, tmp_path, "alpha", "--alphas", "0,0.5,1")
    assert seconds < 30
    assert [row["alpha"] for row in table["rows"]] == [0.0, 0.5, 1.0]
    assert [row["run_setting"] for row in table["rows"]] == [False, True, False]
    for row in table["rows"]:
        assert row["kl_teacher_head"] >= 0.0 and row["kl_teacher_head_at_tau"] >= 0.0
    assert table["rows"][1]["accuracy"]["distill"] == results["accuracy"]["distill"]
    assert table["reproduces_run"] is True and table["settings"]["tau"] == cfg.tau
    assert "| alpha | Distill head | EmoVLM-KD | KL at T=1 | KL at T=2 |" in markdown
    assert "| 0.5 (run) |" in markdown and "Figure 3" in markdown


def test_gate_table_on_the_runs_head(trained_run, tmp_path, no_models):
    _, run_dir, results = trained_run
    table, markdown, seconds = ablate(run_dir, tmp_path, "gate")
    assert seconds < 30
    assert [row["gate_type"] for row in table["rows"]] == [
        "concat_linear", "moe", "bilinear", "dynamic_weighting", "cross_gating"]
    assert [row["paper"]["fi"] for row in table["rows"]] == [79.51, 79.24, 78.56, 78.14, 78.01]
    assert [row["run_setting"] for row in table["rows"]] == [True, False, False, False, False]
    assert table["rows"][0]["gate_parameters"] == 2 * 8 * 8 + 8
    assert table["branches"]["distill"] == results["accuracy"]["distill"]  # the run's head, as saved
    assert table["rows"][0]["accuracy"]["emovlm_kd"] == results["accuracy"]["emovlm_kd"]
    assert table["reproduces_run"] is True
    assert "| Concat & Linear (run) |" in markdown and "| CrossGating |" in markdown and "| 78.01 |" in markdown


def test_the_runs_settings_retrain_the_saved_head_and_gate_exactly(trained_run):
    """The ablation's training is the stages' own: the run's settings give its head and gate weights bit for bit."""
    from safetensors.torch import load_file

    from emovlm_kd.evaluation.ablations import fit_gate, fit_head, load_run_tensors, load_settings

    _, run_dir, _ = trained_run
    run_cfg, cfg = load_settings(run_dir, {})
    data = load_run_tensors(run_dir, run_cfg)
    assert data.gate_split == "val" and set(data.splits) == {"train", "val", "test"}
    head, head_logits = fit_head(cfg, data)
    for name, tensor in load_file(run_dir / "stage3_distill" / "head.safetensors").items():
        assert torch.equal(head.state_dict()[name], tensor), name
    gate, _ = fit_gate(cfg, data, head_logits)
    for name, tensor in load_file(run_dir / "stage4_gate" / "gate.safetensors").items():
        assert torch.equal(gate.state_dict()[name], tensor), name


def test_rerun_gives_the_same_tables(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    first = ablate(run_dir, tmp_path / "a", "alpha", "--alphas", "0.2,0.8", "--distill-epochs", "3")
    second = ablate(run_dir, tmp_path / "b", "alpha", "--alphas", "0.2,0.8", "--distill-epochs", "3")
    assert first[:2] == second[:2]
    assert first[0]["settings"]["distill_epochs"] == 3.0
    assert first[0]["reproduces_run"] is None  # no row has the run's settings


def test_flags_override_the_runs_settings_and_unmark_the_run_row(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    table, markdown, _ = ablate(run_dir, tmp_path, "gate", "--gates", "concat_linear", "--seed", "1")
    assert table["settings"]["seed"] == 1 and table["rows"][0]["run_setting"] is False
    assert table["reproduces_run"] is None and "(run)" not in markdown.split("|---|")[1]


def test_kl_teacher_head():
    from emovlm_kd.evaluation.ablations import kl_teacher_head

    logits = torch.randn(5, 4)
    assert kl_teacher_head(logits, logits) == pytest.approx(0.0, abs=1e-6)
    teacher, head = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    for temperature in (1.0, 2.0):
        p_t, p_s = (teacher / temperature).softmax(-1), (head / temperature).softmax(-1)
        expected = float((p_t * (p_t.log() - p_s.log())).sum())
        assert kl_teacher_head(teacher, head, temperature) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Usage errors: exit status 2 and a message that says what to do
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["alpha", "--alphas", "0.5,2"], "--alphas: every alpha must be in [0, 1]"),
    (["alpha", "--alphas", "0.5,0.5"], "listed twice"),
    (["head-depth", "--depths", "64;a"], "--depths"),
    (["gate", "--gates", "concat_linear,softmax"], "--gates: unknown gate type 'softmax'"),
    (["alpha", "--tau", "0"], "--tau must be > 0"),
    (["head-depth", "--gate-type", "nope"], "--gate-type must be one of"),
])
def test_bad_flags_exit_2(trained_run, tmp_path, capsys, args, message):
    _, run_dir, _ = trained_run
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", *args, "--run", str(run_dir), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_without_caches_says_to_train_first(trained_run, tmp_path, capsys):
    import shutil

    _, run_dir, _ = trained_run
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "gate", "--run", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "run `emovlm-kd train` first" in capsys.readouterr().err
    shutil.copy(run_dir / "train_config.json", tmp_path / "train_config.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "alpha", "--run", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no vlm_pass-train-*.safetensors" in err and "emovlm-kd train` first" in err
