"""The embedded demo's inputs: a synthetic image dataset and tiny base models (VLM and ViT teacher), built offline
under RUN/ and then used like a user's dataset and checkpoints."""

from pathlib import Path

from emovlm_kd.distributed import barrier, is_main_process
from emovlm_kd.folders import staged_folder

# The demo's synthetic data: 24 train, 12 val and 8 test images per class; 5 % of the labels wrong in every split
# (train's: make_synthetic_dataset's default). With clean held-out labels the head classified every val image right
# and no temperature could be fitted (the NLL falls all the way to T -> 0); 12 val images per class leave half of
# val to calibrate the gate, which trains on the other half (`--gate-data val`, demo.yaml).
DEMO_PER_CLASS = (24, 12, 8)
DEMO_HELD_OUT_NOISE = 0.05


def prepare_demo_inputs(run_dir, seed, backbone="qwen2_vl", data=True, vlm=True, teacher=True):
    """The embedded demo's synthetic dataset and tiny base models, written under RUN/ like real inputs; only the parts
    asked for (`data`, `vlm`, `teacher`): a run on a user's dataset gets no synthetic images. The VLM is a
    tiny `backbone` (a `model_type`: qwen2_vl, qwen2_5_vl, qwen3_vl) in RUN/base/vlm (Qwen2-VL) or
    RUN/base/vlm-<backbone>, so that a folder never hands one backbone's base model to a run of another. Returns the
    three locations (None for a part not asked for)."""
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_teacher, build_tiny_vlm

    run_dir = Path(run_dir)
    vlm_name = "vlm" if backbone == "qwen2_vl" else f"vlm-{backbone}"
    data_dir, vlm_dir, teacher_dir = run_dir / "data" / "synthetic", run_dir / "base" / vlm_name, run_dir / "base" / "teacher"
    if is_main_process():
        if data:
            make_synthetic_dataset(data_dir, per_class=DEMO_PER_CLASS, held_out_noise=DEMO_HELD_OUT_NOISE)
        if vlm and not (vlm_dir / "config.json").exists():
            processor = build_tiny_processor(backbone=backbone)
            model = build_tiny_vlm(processor.tokenizer, seed=seed, hidden_size=128, num_heads=4, num_layers=2,
                                   vision_dim=64, vision_depth=2, backbone=backbone)
            with staged_folder(vlm_dir) as tmp:  # renamed into place when complete
                model.save_pretrained(str(tmp))
                processor.save_pretrained(str(tmp))
        if teacher and not (teacher_dir / "config.json").exists():
            build_tiny_teacher(teacher_dir, seed)
    barrier()
    return data_dir if data else None, vlm_dir if vlm else None, teacher_dir if teacher else None
