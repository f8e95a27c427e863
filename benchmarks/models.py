"""What the benchmark measures: the random `7b` / `small` / `tiny` models (or a real checkpoint), random images as
model inputs, the slow brute-force score the fast path is checked against, and parameter / weight counts (Qwen2-VL-7B's,
Qwen2.5-VL-7B's and Qwen3-VL-8B's from their configs on the `meta` device).

`--backbone` picks the backbone `model_type` of the `7b` and `tiny` presets: `7b` is then Qwen2-VL-7B-Instruct's,
Qwen2.5-VL-7B-Instruct's or Qwen3-VL-8B-Instruct's exact shape (random weights, the tiny offline tokenizer)."""

import contextlib
import copy

import numpy as np
import torch
from PIL import Image

# Qwen2-VL-7B(-Instruct)'s architecture, from its config.json (written down: nothing is downloaded).
QWEN2_VL_7B = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_size": 3584,
        "in_chans": 3,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}
PAPER_HEAD_HIDDEN = [1024]

# Qwen2.5-VL-7B-Instruct's config.json (written down: nothing is downloaded): the text model is Qwen2-VL-7B's; the
# vision tower has SwiGLU MLPs, RMSNorm and windowed attention (112 px windows, full attention in blocks 7, 15, 23,
# 31). Source: the Hub repo's config.json as reproduced in public code (e.g. Qwen-Image text-encoder loaders, whose
# encoder is Qwen2.5-VL-7B-Instruct); 8,292,166,656 parameters (the Hub's `numParameters`, the safetensors total).
QWEN2_5_VL_7B = {
    "text_config": {**QWEN2_VL_7B["text_config"], "max_position_embeddings": 128000},
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    **{key: QWEN2_VL_7B[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id", "tie_word_embeddings")},
}
# Qwen3-VL-8B-Instruct's config.json: head_dim 128, interleaved M-RoPE [24, 20, 20], rope_theta 5e6; a 27-block vision
# tower with 16 px patches, a 48 x 48 learnt position grid and deepstack mergers after blocks 8, 16, 24. Source: the
# Hub repo's config.json, as reproduced in NVIDIA TensorRT-LLM's Qwen3-VL model test (QWEN3_VL_8B_CONFIG);
# 8,767,123,696 parameters (the Hub API's safetensors total, revision 0c351dd).
QWEN3_VL_8B = {
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "in_channels": 3,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    **{key: QWEN2_VL_7B[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id", "tie_word_embeddings")},
}
# the real model of each backbone that the `7b` preset copies: (Hub name, config.json's fields)
REAL_SIZES = {
    "qwen2_vl": ("Qwen/Qwen2-VL-7B-Instruct", QWEN2_VL_7B),
    "qwen2_5_vl": ("Qwen/Qwen2.5-VL-7B-Instruct", QWEN2_5_VL_7B),
    "qwen3_vl": ("Qwen/Qwen3-VL-8B-Instruct", QWEN3_VL_8B),
}

# Qwen2-VL-7B's exact shape as `emovlm_kd.tiny.build_tiny_vlm` widths (8,291,375,616 parameters; the tokenizer is the
# tiny offline one, its ids inside the 7B vocabulary)
QWEN2_VL_7B_WIDTHS = {
    "hidden_size": 3584,
    "num_layers": 28,
    "num_heads": 28,
    "vision_dim": 1280,
    "vision_depth": 32,
    "text": {
        "vocab_size": 152064,
        "intermediate_size": 18944,
        "num_key_value_heads": 4,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision": {"num_heads": 16, "mlp_ratio": 4},
}
# The same shapes for the other backbones (8,292,166,656 and 8,767,123,696 parameters)
QWEN2_5_VL_7B_WIDTHS = {
    "hidden_size": 3584,
    "num_layers": 28,
    "num_heads": 28,
    "vision_dim": 1280,
    "vision_depth": 32,
    "text": dict(QWEN2_VL_7B_WIDTHS["text"]),
    "vision": {"num_heads": 16, "intermediate_size": 3420, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
               "tokens_per_second": 2},
}
QWEN3_VL_8B_WIDTHS = {
    "hidden_size": 4096,
    "num_layers": 36,
    "num_heads": 32,
    "vision_dim": 1152,
    "vision_depth": 27,
    "text": {"vocab_size": 151936, "intermediate_size": 12288, "num_key_value_heads": 8,
             "rope_parameters": dict(QWEN3_VL_8B["text_config"]["rope_parameters"])},
    "vision": {"num_heads": 16, "intermediate_size": 4304, "num_position_embeddings": 2304,
               "deepstack_visual_indexes": [8, 16, 24]},
}
SEVEN_B_WIDTHS = {"qwen2_vl": QWEN2_VL_7B_WIDTHS, "qwen2_5_vl": QWEN2_5_VL_7B_WIDTHS, "qwen3_vl": QWEN3_VL_8B_WIDTHS}
# `--train`: stage 1 at 7B widths with reduced depth (2.15 B parameters), labelled as such in the report
TRAIN_7B_DEPTH = {"num_layers": 4, "vision_depth": 4}

CONFIGS = {
    "7b": {
        "widths": QWEN2_VL_7B_WIDTHS,
        "head_hidden_sizes": PAPER_HEAD_HIDDEN,
        "image_size": 448,  # 32 x 32 patches -> 256 LLM tokens
        "batch_sizes": "1,8,32",
        "device": "cuda",  # built directly there in bfloat16: an 8 B float32 initialisation on the CPU takes minutes
        "dtype": "bfloat16",
        "stage_images": 32,
        "runs": 15,
        "warmup": 3,
        "reference_gate_epochs": 1,
    },
    "small": {
        "widths": {
            "hidden_size": 448,  # 3584 / 8
            "num_layers": 7,  # 28 / 4
            "num_heads": 7,  # head_dim 64
            "vision_dim": 160,  # 1280 / 8
            "vision_depth": 8,  # 32 / 4
            "text": {
                "vocab_size": 32768,
                "intermediate_size": 2368,  # 18944 / 8
                "num_key_value_heads": 1,  # 28:4 query:key-value heads -> 7:1
                "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},  # [16, 24, 24] for head_dim 64
            },
            "vision": {"num_heads": 2, "mlp_ratio": 4},  # head_dim 80 as in 7B
        },
        "head_hidden_sizes": [128],  # 1024 / 8
        "image_size": 224,
        "batch_sizes": "1,8",
        "device": None,
        "dtype": None,
        "stage_images": 192,
        "runs": 15,
        "warmup": 2,
        "reference_gate_epochs": 2,
    },
    "tiny": {
        "widths": {},
        "head_hidden_sizes": [64],
        "image_size": 56,
        "batch_sizes": "1,8",
        "device": None,
        "dtype": None,
        "stage_images": 8,
        "runs": 5,
        "warmup": 1,
        "reference_gate_epochs": None,  # all
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------


def preset_widths(config_name, backbone="qwen2_vl"):
    """The `build_tiny_vlm` widths of a preset on a backbone; `small` exists for Qwen2-VL only."""
    if backbone == "qwen2_vl":
        return CONFIGS[config_name]["widths"]
    if config_name == "7b":
        return SEVEN_B_WIDTHS[backbone]
    if config_name == "tiny":
        return {}
    raise ValueError(f"--config {config_name} is Qwen2-VL's; --backbone {backbone} goes with --config 7b or tiny")


def build_random_model(config_name, seed=0, image_size=None, device=None, dtype=None, depth=None,
                       backbone="qwen2_vl"):
    """(model, processor): a randomly initialised EmoVLM-KD bundle over the FI labels on `backbone` (a model_type),
    built offline, its weights created directly on `device` (e.g. "cuda", or "meta" for a construction without
    memory) in `dtype` (default float32). `depth` overrides the preset's `num_layers` / `vision_depth` (e.g.
    `TRAIN_7B_DEPTH`)."""
    from emovlm_kd.labels import MIKELS8
    from emovlm_kd.tiny import (
        build_tiny_processor,
        build_tiny_tokenizer,
        build_tiny_vlm,
    )
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    preset = CONFIGS[config_name]
    side = image_size or preset["image_size"]
    tokenizer = build_tiny_tokenizer()
    if config_name == "tiny":
        processor = build_tiny_processor(tokenizer, backbone=backbone)
    else:  # the image keeps its size: 224 x 224 -> 16 x 16 patches -> 64 LLM tokens (448 x 448 -> 256; Qwen3-VL: 196)
        processor = build_tiny_processor(tokenizer, min_pixels=side * side, max_pixels=side * side, backbone=backbone)
    widths = {**copy.deepcopy(preset_widths(config_name, backbone)), **(depth or {})}
    with default_dtype(dtype), torch.device(device or "cpu"):
        vlm = build_tiny_vlm(processor.tokenizer, seed=seed, backbone=backbone, **widths)
        torch.manual_seed(seed + 1)
        model = EmoVLMKDForImageClassification.from_vlm(
            vlm, MIKELS8, processor=processor, head_hidden_sizes=preset["head_hidden_sizes"]
        )
    return model.eval(), processor


@contextlib.contextmanager
def default_dtype(dtype):
    """Tensors created inside are of `dtype` (None: unchanged); the previous default comes back after."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(name_or_path, dtype=None):
    """(model, processor) from an EmoVLM-KD bundle, or a Qwen2-VL checkpoint wrapped with a random head and gate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from emovlm_kd.hub import checkpoint_model_type, load_bundle
    from emovlm_kd.labels import MIKELS8
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    if checkpoint_model_type(name_or_path) == "emovlm_kd":  # read from config.json; no code from the folder runs
        return load_bundle(name_or_path, dtype=dtype)  # checked, answer tokens included (emovlm_kd.modelcheck)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    vlm = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    torch.manual_seed(0)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, MIKELS8, processor=processor)
    model.distill_head.to(vlm.dtype)
    model.gate.to(vlm.dtype)
    return model.eval(), processor


def random_images(count, side, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def make_inputs(model, processor, images):
    """The model's inputs for `images` (one prompt each), on its device, pixels in its dtype."""
    from pipeline_emovlm_kd import prepare_inputs

    inputs = prepare_inputs(processor, model.config, images).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def split_inputs(inputs):
    """One unpadded batch-1 input per row of a (left- or right-padded) batch."""
    counts = inputs["image_grid_thw"].prod(-1).tolist()
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        valid = inputs["attention_mask"][b].bool()
        rows.append(
            {
                "input_ids": inputs["input_ids"][b][valid][None],
                "attention_mask": torch.ones_like(inputs["input_ids"][b][valid][None]),
                "mm_token_type_ids": inputs["mm_token_type_ids"][b][valid][None],
                "pixel_values": inputs["pixel_values"][offsets[b] : offsets[b + 1]],
                "image_grid_thw": inputs["image_grid_thw"][b : b + 1],
            }
        )
    return rows


@torch.inference_mode()
def brute_force_log_likelihoods(model, inputs):
    """The slow, obvious score: per sample and label, one full forward of prompt + that label's answer tokens with
    the VLM's own encoder pass, summing the answer tokens' log-probabilities. (B, C), float32."""
    answers = model.config.label_answer_token_ids
    out = torch.zeros(inputs["input_ids"].shape[0], len(answers))
    for b, row in enumerate(split_inputs(inputs)):
        for c, answer in enumerate(answers):
            answer_ids = torch.tensor([answer], device=row["input_ids"].device)
            ids = torch.cat([row["input_ids"], answer_ids], dim=1)
            logits = model.vlm(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=row["pixel_values"],
                image_grid_thw=row["image_grid_thw"],
                mm_token_type_ids=torch.cat([row["mm_token_type_ids"], torch.zeros_like(answer_ids)], dim=1),
            ).logits
            log_probs = logits[0, -len(answer) - 1 : -1].float().log_softmax(-1)
            out[b, c] = log_probs.gather(-1, answer_ids[0][:, None]).sum().cpu()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def weights_mb(*modules):
    """MB of the parameters and buffers the modules hold together (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return round(total / 2**20, 1)


def _param_summary(vlm, head, gate):
    backbone, head_n, gate_n = count_params(vlm), count_params(head), count_params(gate)
    total = backbone + head_n + gate_n
    return {
        "backbone": backbone,
        "visual_encoder": count_params(vlm.model.visual),
        "head": head_n,
        "gate": gate_n,
        "total": total,
        "head_gate_share": (head_n + gate_n) / total,
    }


def param_counts(model):
    """Backbone, visual encoder, head and gate of `model`, and the head + gate share of the total."""
    return _param_summary(model.vlm, model.distill_head, model.gate)


def qwen2_vl_7b_param_counts(num_labels=8, head_hidden_sizes=PAPER_HEAD_HIDDEN, gate_type="concat_linear"):
    """Parameter counts at Qwen2-VL-7B's real size: the backbone instantiated on the `meta` device from its config."""
    return real_size_param_counts("qwen2_vl", num_labels, head_hidden_sizes, gate_type)


def real_size_param_counts(backbone, num_labels=8, head_hidden_sizes=PAPER_HEAD_HIDDEN, gate_type="concat_linear"):
    """Parameter counts at the real size of `backbone`'s model in `REAL_SIZES` (Qwen2-VL-7B, Qwen2.5-VL-7B,
    Qwen3-VL-8B): the backbone instantiated on the `meta` device from its config."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from configuration_emovlm_kd import EmoVLMKDConfig
    from modeling_emovlm_kd import EmoVLMKDDistillationHead, build_gate

    config = CONFIG_MAPPING[backbone](**copy.deepcopy(REAL_SIZES[backbone][1]))
    with torch.device("meta"):
        vlm = AutoModelForImageTextToText._model_mapping[type(config)](config)
    labels = [str(i) for i in range(num_labels)]
    emo_config = EmoVLMKDConfig(
        vlm_config=config, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        gate_type=gate_type,
    )
    head = EmoVLMKDDistillationHead(config.text_config.hidden_size, head_hidden_sizes, num_labels, 0.1)
    return _param_summary(vlm, head, build_gate(emo_config))


def visual_encoder_count(*modules):
    """Distinct visual-encoder modules reachable from `modules` (the reference holds a copy: one more)."""
    kinds = {type(m.vlm.model.visual) for m in modules if hasattr(m, "vlm")}
    seen = set()
    for module in modules:
        for sub in module.modules() if isinstance(module, torch.nn.Module) else ():
            if type(sub) in kinds:
                seen.add(id(sub))
    return len(seen)
