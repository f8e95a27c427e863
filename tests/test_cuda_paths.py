"""The code paths the CUDA failures of issue 14 pointed at, checked where they can be on the CPU: where the ablations
create, train and evaluate the head and the gate (the run's device, float32), the launch check for processes sharing
a GPU, and the determinism settings a run applies."""

import os

import pytest
import torch

from emovlm_kd import distributed
from emovlm_kd.errors import UsageError

# ---------------------------------------------------------------------------------------------------------------
# Several processes on one GPU: a clear error before any work
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes,devices", [(1, 0), (2, 0), (1, 1), (2, 2), (2, 8)])
def test_a_process_per_gpu_or_the_cpu_is_accepted(processes, devices):
    assert distributed.check_processes_per_device(processes, devices) is None


@pytest.mark.parametrize("processes,devices", [(2, 1), (8, 4)])
def test_processes_sharing_a_gpu_stop_with_what_to_do(processes, devices):
    with pytest.raises(UsageError) as error:
        distributed.check_processes_per_device(processes, devices)
    message = str(error.value)
    assert f"{processes} processes" in message and f"only {devices} CUDA device(s)" in message
    assert f"--nproc_per_node {devices}" in message and "CUDA_VISIBLE_DEVICES=" in message


def test_state_checks_the_launch_before_joining_the_process_group(monkeypatch):
    """torchrun's LOCAL_WORLD_SIZE=2 with one visible GPU: `state()` raises before accelerate's PartialState (which
    would join NCCL) is created."""

    class NotJoined:
        _shared_state = {}  # noqa: RUF012  (accelerate's class attribute, empty: not joined)

        def __init__(self, *args, **kwargs):
            raise AssertionError("joined the process group before checking the launch")

    monkeypatch.setattr(distributed, "PartialState", NotJoined)
    monkeypatch.setattr(distributed, "visible_cuda_devices", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="2 processes were launched on this node but only 1 CUDA device"):
        distributed.state()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed.local_processes() == 1
    with pytest.raises(AssertionError, match="joined the process group"):  # one process: no objection, joins
        distributed.state()


# ---------------------------------------------------------------------------------------------------------------
# Determinism settings
# ---------------------------------------------------------------------------------------------------------------


def test_deterministic_sets_what_it_says_and_restores_it(monkeypatch):
    from emovlm_kd.determinism import determinism_settings, deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = determinism_settings()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert determinism_settings() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic(warn_only=False):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert determinism_settings() == before


def test_deterministic_keeps_a_cublas_setting_the_user_made(monkeypatch):
    from emovlm_kd.determinism import deterministic

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_restores_the_settings_after_an_error(monkeypatch):
    from emovlm_kd.determinism import determinism_settings, deterministic

    before = determinism_settings()
    with pytest.raises(RuntimeError, match="stage failed"), deterministic():
        raise RuntimeError("stage failed")
    assert determinism_settings() == before


# ---------------------------------------------------------------------------------------------------------------
# Ablations: the head and the gate where the run had them
# ---------------------------------------------------------------------------------------------------------------


def test_small_modules_live_on_the_runs_device(monkeypatch):
    from emovlm_kd import runtime
    from emovlm_kd.evaluation import ablation_data, ablations
    from emovlm_kd.training import runner

    assert ablations.run_device is ablation_data.run_device is runner.run_device is runtime.run_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.run_device().type == "cuda"  # where a CUDA run created and trained them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.run_device() == torch.device("cpu")


class Trained(Exception):
    """Raised by the stand-in trainers once they have recorded what they were given."""


def tiny_tensors(classes=3, hidden=8, rows=6):
    from emovlm_kd.evaluation.ablation_data import RunTensors

    generator = torch.Generator().manual_seed(0)
    split = lambda width: torch.randn(rows, width, generator=generator)
    labels = torch.arange(rows) % classes
    return RunTensors([f"c{i}" for i in range(classes)], {"train": split(hidden), "test": split(hidden)},
                      {"train": split(classes), "test": split(classes)},
                      {"train": split(classes), "test": split(classes)}, {"train": labels, "test": labels}, "train")


def test_ablation_heads_and_gates_start_in_float32_on_the_runs_device(monkeypatch):
    """`fit_head` and `fit_gate` hand the training stages a module already on the run's device, in float32, as
    stages 3 and 4 do, so the seeded initialisation draws from the same generator (CUDA's on a CUDA machine; `meta`
    stands in for it here)."""
    from emovlm_kd.evaluation import ablations
    from emovlm_kd.training import heads
    from emovlm_kd.training.config import TrainConfig

    seen = []

    def record(cfg, module, *args, **kwargs):
        seen.append({(p.device.type, p.dtype) for p in module.parameters()})
        raise Trained

    monkeypatch.setattr(ablations, "run_device", lambda: torch.device("meta"))
    monkeypatch.setattr(heads, "train_head", record)
    monkeypatch.setattr(heads, "train_gate", record)
    cfg, data = TrainConfig(head_hidden_sizes=[4], gate_data="train"), tiny_tensors()
    with pytest.raises(Trained):
        ablations.fit_head(cfg, data)
    with pytest.raises(Trained):
        ablations.fit_gate(cfg, data, {"train": torch.randn(6, 3), "test": torch.randn(6, 3)})
    assert seen == [{("meta", torch.float32)}, {("meta", torch.float32)}]


def test_a_trained_module_is_evaluated_in_the_runs_dtype_and_returned_as_trained(monkeypatch):
    """The run evaluates its trained float32 head and gate in its dtype (bfloat16 on CUDA); the ablation evaluates a
    copy so, and keeps the trained float32 weights (what the stages save) untouched."""
    from emovlm_kd.evaluation import ablations
    from emovlm_kd.training.config import TrainConfig

    monkeypatch.setattr(ablations, "run_device", lambda: torch.device("cpu"))
    layer = torch.nn.Linear(4, 2)
    weight = layer.weight.detach().clone()
    evaluated = ablations.as_evaluated(layer, TrainConfig(dtype="bfloat16"))
    assert evaluated.weight.dtype == torch.bfloat16 and not evaluated.weight.requires_grad
    assert torch.equal(evaluated.weight, weight.to(torch.bfloat16))
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight)


def test_head_and_gate_training_twice_under_strict_determinism_give_the_same_weights(tmp_path):
    """Stages 3 and 4's training (`train_head`, `train_gate`) on the device a run uses, twice, with deterministic
    algorithms required (`warn_only=False`: an op without a deterministic kernel on this device is an error): the
    same weights bit for bit. On a CUDA machine this checks the CUDA kernels."""
    from emovlm_kd.determinism import deterministic
    from emovlm_kd.evaluation.ablations import QUIET
    from emovlm_kd.runtime import run_device
    from emovlm_kd.training import heads
    from emovlm_kd.training.config import TrainConfig
    from modeling_emovlm_kd import GATE_CLASSES, EmoVLMKDDistillationHead

    data = tiny_tensors(rows=12)
    cfg = TrainConfig(head_hidden_sizes=[4], head_dropout=0.1, distill_epochs=2.0, gate_epochs=2.0,
                      distill_batch_size=4, gate_batch_size=4, seed=0)
    probs = data.vlm_log_likelihoods["train"].softmax(-1)

    def train_both(folder):
        head = EmoVLMKDDistillationHead(8, [4], 3, 0.1).to(run_device())
        gate = GATE_CLASSES["concat_linear"](3).to(run_device())
        heads.train_head(cfg.distill_args, head, data.features["train"], data.teacher_logits["train"],
                         data.labels["train"], folder / "head", seed=cfg.seed, **QUIET)
        heads.train_gate(cfg.gate_args, gate, probs, probs, data.labels["train"], folder / "gate", seed=cfg.seed,
                         **QUIET)
        return {**head.state_dict(), **{f"gate.{k}": v for k, v in gate.state_dict().items()}}

    with deterministic(warn_only=False):
        first, second = train_both(tmp_path / "a"), train_both(tmp_path / "b")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------------------------------------------------------
# One device/dtype resolver, one definition of the flags
# ---------------------------------------------------------------------------------------------------------------


def test_dtype_names_resolve_to_torch_dtypes_and_auto_follows_cuda(monkeypatch):
    from emovlm_kd.runtime import resolve_dtype

    assert resolve_dtype(None) is None  # the dtype as saved
    assert [resolve_dtype(name) for name in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float16]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32


def test_a_given_device_is_kept_and_none_is_this_processs_own(monkeypatch):
    from emovlm_kd.runtime import resolve_device

    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"


def test_every_command_with_device_flags_takes_the_one_definition():
    from emovlm_kd.cli import build_parser
    from emovlm_kd.helptext import parsers_of
    from emovlm_kd.settings import DTYPES

    flags = {}
    for parser in parsers_of(build_parser()):
        for action in parser._actions:
            if action.dest in ("device", "dtype"):
                flags.setdefault(parser.prog.split()[-1], {})[action.dest] = (action.choices, action.default,
                                                                             action.help)
    assert {"predict", "evaluate", "table1", "demo"} <= set(flags)
    for command, found in flags.items():
        assert found["dtype"] == (DTYPES, None, "weights dtype (default: as saved)"), command
        assert found["device"] == (None, None, "cpu, cuda, cuda:1 ... (default: cuda when available)"), command
