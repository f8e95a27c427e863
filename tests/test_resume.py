"""Resume that is right at every point.

- Every checkpoint a stage's Trainer writes is restored with every key, or the resume stops (`CheckpointError`):
  the ViT teacher's (saved under transformers' legacy key names), a LoRA adapter's, the head's and the gate's.
- Incomplete checkpoints (a kill while the Trainer wrote one, or deleted an older one) are removed with one log
  line, and the newest complete one is resumed.
- Kill-anywhere: `emovlm-kd train` killed at file-system events spread over every stage (mid-write of checkpoints
  and of the export included), restarted on the same folder each time, ends with the same `RUN/model` and
  `eval_results.json` as an uninterrupted run. The runs are children of a `multiprocessing` forkserver that has
  imported the training code once (`kill_at_write.PRELOAD`); `kill_at_write` kills a child at a chosen event,
  deterministically (no timing).
"""

import json
import logging
import multiprocessing
import os
import random
from pathlib import Path

import kill_at_write
import pytest
import torch
from conftest import tiny_settings
from safetensors.torch import load_file, save_file

from emovlm_kd.training.stage import Stage, checkpoint_problem, last_checkpoint
from emovlm_kd.training.trainers import (
    CheckpointError,
    VerifiedTrainer,
    restore_checkpoint_weights,
)

# ---------------------------------------------------------------------------------------------------------------
# Every key restored
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_vit(tiny_inputs):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(tiny_inputs[2], num_labels=3, ignore_mismatched_sizes=True)


def test_a_vit_checkpoint_is_saved_under_legacy_names_that_a_plain_state_dict_load_misses(tiny_vit, tmp_path):
    """The cause: `save_pretrained` reverts transformers 5's renaming (vit.layers.* -> vit.encoder.layer.*), and the
    Trainer's own resume loads the file as it is, `strict=False`."""
    tiny_vit.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("vit.encoder.layer.") for k in saved)
    assert any(k.startswith("vit.layers.") for k in tiny_vit.state_dict())
    result = tiny_vit.load_state_dict(saved, strict=False)
    assert len(result.missing_keys) == 32 and len(result.unexpected_keys) == 32


def test_a_vit_checkpoint_restores_every_weight(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path)
    expected = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    with torch.no_grad():
        for tensor in tiny_vit.parameters():
            tensor.add_(1.0)
    restore_checkpoint_weights(tiny_vit, tmp_path)
    restored = tiny_vit.state_dict()
    assert restored.keys() == expected.keys() and len(expected) == 40
    assert all(torch.equal(restored[k], expected[k]) for k in expected)


def test_a_vit_checkpoint_of_another_architecture_stops_the_resume(tiny_vit, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    deeper = ViTConfig(**{**tiny_vit.config.to_dict(), "num_hidden_layers": 3})
    ViTForImageClassification(deeper).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unexpected"):
        restore_checkpoint_weights(tiny_vit, tmp_path)


def test_a_module_checkpoint_with_a_missing_or_extra_key_stops_the_resume(tmp_path):
    head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    state = {k: v.clone() + 1 for k, v in head.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    restore_checkpoint_weights(head, tmp_path)
    assert all(torch.equal(head.state_dict()[k], state[k]) for k in state)
    save_file({k: v for k, v in state.items() if k != "2.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \(2\.bias\)"):
        restore_checkpoint_weights(head, tmp_path)
    save_file({**state, "3.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(3\.weight\)"):
        restore_checkpoint_weights(head, tmp_path)


def lora_model(seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1"]))
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter differ from a fresh one
        for name, tensor in model.named_parameters():
            if "lora_" in name:
                tensor.normal_()
    return model


def test_an_adapter_checkpoint_restores_every_adapter_weight_or_stops(tmp_path):
    from peft import get_peft_model_state_dict

    trained = lora_model(seed=1)
    trained.save_pretrained(tmp_path)
    fresh = lora_model(seed=2)
    restore_checkpoint_weights(fresh, tmp_path)
    want, got = get_peft_model_state_dict(trained), get_peft_model_state_dict(fresh)
    assert want.keys() == got.keys() and len(want) == 4
    assert all(torch.equal(want[k], got[k]) for k in want)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    dropped = min(saved)
    save_file({k: v for k, v in saved.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="1 missing"):
        restore_checkpoint_weights(lora_model(seed=3), tmp_path)


class Pixels(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 48, 48, generator=generator), "labels": index % 3}


def train_vit(tiny_inputs, output_dir, resume=None):
    from transformers import TrainingArguments, ViTForImageClassification, set_seed

    set_seed(0)
    model = ViTForImageClassification.from_pretrained(tiny_inputs[2], num_labels=3, ignore_mismatched_sizes=True)
    args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="epoch", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    VerifiedTrainer(model=model, args=args, train_dataset=Pixels()).train(resume_from_checkpoint=resume)
    return model.state_dict()


def test_a_teacher_resumed_from_its_first_checkpoint_ends_as_the_uninterrupted_one(tiny_inputs, tmp_path):
    """Issue 12: resuming the ViT teacher gave another model (32 of 40 tensors not restored)."""
    straight = train_vit(tiny_inputs, tmp_path / "straight")
    resumed = train_vit(tiny_inputs, tmp_path / "resumed_from", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------------------------------------------------------
# Incomplete checkpoints
# ---------------------------------------------------------------------------------------------------------------


def write_checkpoint(folder, step, weights="model.safetensors"):
    """A checkpoint folder holding what `Trainer._save_checkpoint` writes (small stand-ins of each file)."""
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64)}, folder / weights)
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step, "pad": torch.zeros(256)}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def cut_to_half(path):
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage,problem", [
    (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda c: (c / "rng_state.pth").unlink(), "no rng_state.pth"),
    (lambda c: (c / "model.safetensors").unlink(), "no weights"),
    (lambda c: cut_to_half(c / "trainer_state.json"), "cut short: trainer_state.json"),
    (lambda c: cut_to_half(c / "model.safetensors"), "cut short: model.safetensors"),
    (lambda c: cut_to_half(c / "optimizer.pt"), "cut short: optimizer.pt"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "not of step 4"),
])
def test_checkpoint_problem_names_what_is_missing_or_cut_short(tmp_path, damage, problem):
    checkpoint = write_checkpoint(tmp_path / "checkpoint-4", 4)
    assert checkpoint_problem(checkpoint, 4) == ""
    damage(checkpoint)
    assert problem in checkpoint_problem(checkpoint, 4)


def test_an_adapter_checkpoint_is_complete_with_its_adapter_weights(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoint-2", 2, weights="adapter_model.safetensors")
    assert checkpoint_problem(checkpoint, 2) == ""


def test_the_newest_complete_checkpoint_is_resumed_and_incomplete_ones_removed_in_one_line(tmp_path, caplog):
    write_checkpoint(tmp_path / "checkpoint-2", 2)
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    cut_to_half(write_checkpoint(tmp_path / "checkpoint-6", 6) / "scheduler.pt")
    (tmp_path / "checkpoint-8").mkdir()  # killed right after the Trainer made the folder
    (write_checkpoint(tmp_path / "checkpoint-10", 10) / "trainer_state.json").unlink()
    with caplog.at_level(logging.INFO, logger="emovlm_kd.training.stage"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and all(f"checkpoint-{n}" in lines[0] for n in (6, 8, 10))
    assert last_checkpoint(tmp_path / "absent") is None


def test_no_complete_checkpoint_means_training_from_scratch(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    assert last_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoint-3").exists()


def test_a_done_marker_cut_short_means_the_stage_is_not_done(tmp_path):
    stage = Stage(tmp_path, "stage3_distill", key="abc")
    stage.finish(steps=1)
    assert stage.done
    cut_to_half(stage.dir / "DONE.json")
    assert not stage.done


# ---------------------------------------------------------------------------------------------------------------
# Kill anywhere
# ---------------------------------------------------------------------------------------------------------------

EXPORT_STAGING = ".model.emovlm-kd-PID.tmp"  # the export's temp folder (emovlm_kd.folders), as `normalise` writes it
STAGE_FOLDERS = {"stage0_instructions": "stage 0", "stage1_sft": "stage 1", "stage2_teacher": "stage 2",
                 "cache": "caches", "stage3_distill": "stage 3", "stage4_gate": "stage 4",
                 "stage5_export": "export", EXPORT_STAGING: "export", "model": "export",
                 ".model.emovlm-kd-PID.old": "export", "eval_results.json": "export",
                 ".eval_results.json.emovlm-kd-PID.tmp": "export"}
STAGES = ("stage 0", "stage 1", "stage 2", "caches", "stage 3", "stage 4", "export")


def stage_of(path):
    return STAGE_FOLDERS.get(path.split("/")[0], "start")


def checkpoint_of(event):
    """The `checkpoint-N` folder the event is in, or None."""
    parts = event["path"].split("/")
    return parts[2] if len(parts) > 3 and parts[2].startswith("checkpoint-") else None


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver that has imported the training code, on the CPU (kills test file-system facts; the runs must
    match bit for bit, and a forked child must not inherit a CUDA context)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(kill_at_write.PRELOAD)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the forkserver's environment is the one at its start
    try:
        from multiprocessing import forkserver as server

        server.ensure_running()
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return context


class Runs:
    """`emovlm-kd train --config FILE` on one run folder, as forkserver children; each run's events and output are
    kept beside the folder (`events-<i>.jsonl`, `output-<i>.log`)."""

    def __init__(self, context, cfg):
        import yaml

        self.context, self.run_dir = context, Path(cfg.output_dir)
        self.config = self.run_dir.with_suffix(".yaml")
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg.to_dict()))
        self.count = 0

    def start(self, targets=()):
        """(exit code, the events logged, the kill record or None) of one run dying at the first of `targets`."""
        self.count += 1
        log = self.run_dir.parent / f"events-{self.count}.jsonl"
        self.output = self.run_dir.parent / f"output-{self.count}.log"
        process = self.context.Process(target=kill_at_write.run_cli, args=(
            ["train", "--config", str(self.config)], str(self.run_dir), str(log), list(targets), str(self.output)))
        process.start()
        process.join(timeout=600)
        if process.exitcode is None:
            process.kill()
            pytest.fail(f"run {self.count} did not end in 600 s: {self.tail()}")
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        kill = next((r for r in records if "killed" in r), None)
        return process.exitcode, [r for r in records if "killed" not in r], kill

    def tail(self, chars=3000):
        return self.output.read_text(errors="replace")[-chars:] if self.output.exists() else ""


@pytest.fixture(scope="module")
def reference_run(tiny_inputs, tmp_path_factory, forkserver):
    """One uninterrupted run, recorded: (settings, its folder, its events)."""
    cfg = tiny_settings(*tiny_inputs, tmp_path_factory.mktemp("reference") / "run")
    runs = Runs(forkserver, cfg)
    code, events, _ = runs.start()
    assert code == 0, runs.tail()
    return cfg, Path(cfg.output_dir), events


def unique_events(events):
    """The events that happen once in a run (so "the same point" is well defined in a restarted run)."""
    seen = {}
    for event in events:
        seen[event["kind"], event["path"]] = seen.get((event["kind"], event["path"]), 0) + 1
    return [e for e in events if seen[e["kind"], e["path"]] == 1]


def target(event):
    """The kill point at `event`: a written file cut to half its length, anything else done."""
    return {k: event[k] for k in ("kind", "path", "occurrence")} | {
        "mode": "half" if event["kind"] == "write" else "after"}


def kill_plan(events, seed, per_stage=1):
    """Kill points drawn (seeded) from an uninterrupted run's events, in run order, `per_stage` or more a stage:
    in stages 1-4 one mid-write in a checkpoint after the stage's first (the resume then restores the one before);
    in the export a file of the new bundle cut short, and its rename into place."""
    rng = random.Random(seed)
    events = unique_events(events)
    first = {}
    for event in events:
        if checkpoint_of(event):
            first.setdefault(stage_of(event["path"]), checkpoint_of(event))
    chosen = []
    for stage in STAGES:
        pool = [e for e in events if stage_of(e["path"]) == stage]
        later = [e for e in pool if e["kind"] == "write" and checkpoint_of(e) not in (None, first.get(stage))]
        must = [rng.choice(later)] if later else []
        if stage == "export":
            staged = [e for e in pool if e["kind"] == "write" and e["path"].startswith(EXPORT_STAGING + "/")]
            must = [rng.choice(staged),
                    next(e for e in pool if e["kind"] == "rename" and e["path"] == "model")]
        rest = [e for e in pool if e not in must]
        chosen += must + rng.sample(rest, max(0, min(len(rest), per_stage - len(must))))
    return [target(e) for e in sorted(chosen, key=lambda e: e["n"])]


def kill_chain(runs, plan, restarts=None):
    """Run again and again on one folder until a run ends by itself; returns the kill records.

    Each run is armed with the next kill point of `plan` only (a restart may reach a later point's file early:
    deleting an incomplete checkpoint that the uninterrupted run deleted later on). With `restarts` (a seeded
    `random.Random`), the run after each planned kill also dies at its own n-th event (n in 1-12: the removal of
    incomplete checkpoints, the reloads) unless it reaches the planned point first.
    """
    kills, remaining = [], list(plan)
    for _ in range(2 * len(plan) + 2):
        targets = remaining[:1]  # listed first: where both match one event, the planned point is the kill
        if restarts is not None and kills and kills[-1]["target"] in plan:
            targets.append({"n": restarts.randint(1, 12), "mode": "half"})
        code, _, kill = runs.start(targets)
        if kill is None:
            assert code == 0, f"run {runs.count} failed after the kills {kills}:\n{runs.tail()}"
            return kills
        assert code == -9, f"run {runs.count}: exit {code}, not the kill:\n{runs.tail()}"
        kills.append(kill)
        if remaining and kill["target"] == remaining[0]:
            remaining.pop(0)
    pytest.fail(f"no run ended by itself after the kills {kills}")


# Fields of RUN/model that do not describe the model and differ between an uninterrupted and a restarted run:
# config.json's `vlm_config._name_or_path` (a path in the run folder), and the state that the last padded or
# truncating call left in the fast tokenizer, which `save_pretrained` writes with it (tokenizer.json's `padding` and
# `truncation`, and the tokenizer_config.json keys transformers derives from them on loading): whether the process
# that saved stage 1's merged model, or the export, made such a call (SFT batches, the VLM pass) or found its work done.
NOT_THE_MODEL = {}  # every file of RUN/model is compared byte for byte (JSON files as parsed)


def assert_same_outputs(run_dir, reference_dir):
    """The same eval_results.json and the same RUN/model: the weights bit for bit, every other file byte for byte
    (JSON files without the fields of `NOT_THE_MODEL`)."""
    assert json.loads((run_dir / "eval_results.json").read_text()) == \
        json.loads((reference_dir / "eval_results.json").read_text())
    files = sorted(str(p.relative_to(reference_dir / "model")) for p in (reference_dir / "model").rglob("*")
                   if p.is_file())  # examples/*.png too
    assert sorted(str(p.relative_to(run_dir / "model")) for p in (run_dir / "model").rglob("*") if p.is_file()) == files
    got = load_file(run_dir / "model" / "model.safetensors")
    want = load_file(reference_dir / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    for name in files:
        assert model_file(run_dir / "model" / name) == model_file(reference_dir / "model" / name), name


def model_file(path):
    """A bundle file's bytes, or for the JSON files of `NOT_THE_MODEL` their content without those fields."""
    if path.name not in NOT_THE_MODEL:
        return path.read_bytes()
    value = json.loads(path.read_text())
    for field in NOT_THE_MODEL[path.name]:
        *parents, name = field.split(".")
        owner = value
        for parent in parents:
            owner = owner[parent]
        owner.pop(name, None)
    return value


def assert_kills_cover_every_stage(kills):
    """Kills in every stage, mid-write of a checkpoint and of the export, and at the export's rename."""
    hit = [(stage_of(k["killed"]["path"]), k["killed"]["kind"], k["target"]["mode"], k["killed"]["path"])
           for k in kills]
    assert {stage for stage, *_ in hit} >= set(STAGES), hit
    assert any(kind == "write" and mode == "half" and "/checkpoint-" in path for _, kind, mode, path in hit), hit
    assert any(kind == "write" and mode == "half" and path.startswith(EXPORT_STAGING + "/")
               for _, kind, mode, path in hit), hit
    assert any(kind == "rename" and path == "model" for _, kind, _, path in hit), hit


@pytest.mark.timeout(900)
def test_a_run_killed_anywhere_resumes_to_the_same_model(reference_run, forkserver, tmp_path):
    """Killed at one point of each stage (mid-write of a later checkpoint in stages 1-4, of the export, at its
    rename) and restarted each time: the same model and results as the uninterrupted run. (The slow sweep also
    kills the restarts early on, in the removal of incomplete checkpoints and the reloads.)"""
    cfg, reference_dir, events = reference_run
    plan = kill_plan(events, seed=12)
    runs = Runs(forkserver, tiny_settings(cfg.dataset, cfg.vlm, cfg.teacher, tmp_path / "run"))
    kills = kill_chain(runs, plan)
    assert [k["target"] for k in kills] == plan
    assert_kills_cover_every_stage(kills)
    assert_same_outputs(tmp_path / "run", reference_dir)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [1, 2])
def test_a_run_killed_at_many_points_resumes_to_the_same_model(reference_run, forkserver, tmp_path, seed):
    """The longer sweep: four kill points a stage, each restart killed again early on."""
    cfg, reference_dir, events = reference_run
    plan = kill_plan(events, seed=seed, per_stage=4)
    runs = Runs(forkserver, tiny_settings(cfg.dataset, cfg.vlm, cfg.teacher, tmp_path / "run"))
    kills = kill_chain(runs, plan, restarts=random.Random(seed))
    assert [k["target"] for k in kills if k["target"] in plan] == plan
    assert_kills_cover_every_stage(kills)
    assert_same_outputs(tmp_path / "run", reference_dir)
