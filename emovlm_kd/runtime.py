"""Where a command computes and in which dtype: the one resolver of each. The `--device` / `--dtype` flags are
`emovlm_kd.settings.DeviceArguments`' fields."""

from emovlm_kd.settings import AUTO_DTYPE


def resolve_device(device=None):
    """`device` when given, else this process's own: its GPU under torchrun (`cuda:LOCAL_RANK`), `cuda` in one
    process with CUDA, else `cpu`."""
    if device:
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from emovlm_kd import distributed

    return str(distributed.state().device)


def run_device():
    """Where a training run computes, and where stages 3 and 4 (and the ablations) create, initialise and train the
    head and the gate: `cuda` when there is CUDA, else `cpu`. Their seeded initialisation draws from that device's
    generator, so a head or gate created elsewhere would start from other weights."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name):
    """The torch dtype named `name` ("bfloat16" -> `torch.bfloat16`); "auto" is bfloat16 with CUDA, else float32;
    None stays None (the dtype as saved)."""
    if not name:
        return None
    import torch

    if name == AUTO_DTYPE:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)
