"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, tokenizers and processors built offline in seconds (tests,
`emovlm-kd tiny --backbone B`, the demo).

Each backbone is built as its real checkpoints are laid out, only narrower: Qwen2.5-VL with windowed vision attention
(one windowed and one full-attention block) and Qwen3-VL with 16-pixel patches, a learnt position grid, deepstack
mergers feeding the first language-model layers and interleaved M-RoPE. Everything is seeded: the same arguments
give the same bytes on disk.
"""

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from configuration_emovlm_kd import SUPPORTED_BACKBONES

from .folders import staged_folder
from .labels import EKMAN6, MIKELS8, SENTIMENT2

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template, reduced to what image classification and instruction data need.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's chat template adds no default system turn: the prompt starts with the user's turn.
QWEN3_VL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)
assert QWEN3_VL_CHAT_TEMPLATE != CHAT_TEMPLATE

BACKBONES = SUPPORTED_BACKBONES  # the `model_type`s the tiny factory builds
DEFAULT_BACKBONE = "qwen2_vl"

_CORPUS = [
    "Observe the image and select the emotion category that best matches this image from the following "
    "categories. Answer in dictionary form as follows: {'emotion': 'amusement'}",
    "Observe the image and describe key elements of the image.",
    "Observe the image and describe the process of inferring the emotions conveyed in the image.",
    "The image shows warm colours, soft light and a calm scene that evokes a peaceful feeling.",
    "Dark tones and sharp shapes make the scene feel tense; the viewer may feel fear or sadness.",
    "You are a helpful assistant. system user assistant 0123456789",
]


def build_tiny_tokenizer(vocab_size=512):
    """A byte-level BPE trained in-process on a small emotion corpus, with Qwen2-VL's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(_CORPUS)
    for labels in (MIKELS8, EKMAN6, SENTIMENT2):
        corpus += [f"{{'emotion': '{label}'}}" for label in labels] + [", ".join(labels)]
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        model_max_length=4096,
    )


def _check_backbone(backbone):
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return backbone


def build_tiny_processor(tokenizer=None, min_pixels=None, max_pixels=None, backbone=DEFAULT_BACKBONE):
    """The backbone's processor on the tiny tokenizer; images are resized to 4-64 patches (1-16 LLM tokens).

    `min_pixels` / `max_pixels` default to 2 x 2 and 4 x 4 merged patches of the backbone's patch size (14 px for
    Qwen2-VL and Qwen2.5-VL, 16 px for Qwen3-VL, whose released image processor uses mean and std 0.5)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    if _check_backbone(backbone) == "qwen3_vl":
        unit = 16 * 2  # patch size x merge size
        image_processor = Qwen2VLImageProcessor(
            min_pixels=min_pixels or (2 * unit) ** 2, max_pixels=max_pixels or (4 * unit) ** 2, patch_size=16,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )  # fmt: skip
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN3_VL_CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels or 56 * 56, max_pixels=max_pixels or 112 * 112)
    processor_class = Qwen2_5_VLProcessor if backbone == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def _mrope_section(head_dim):
    """Rotary sections (temporal, height, width) summing to head_dim / 2, in the released models' proportions."""
    section = head_dim // 2
    return [section - 2 * (section // 3), section // 3, section // 3]


def tiny_vlm_config(tokenizer, hidden_size=64, num_layers=2, num_heads=2, vision_dim=64, vision_depth=2,
                    backbone=DEFAULT_BACKBONE, **extra):
    """A config of the backbone `model_type` at the given widths (multiples of 64 keep 4-bit quantisation usable)."""
    head_dim = hidden_size // num_heads
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    text_config = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    config_class, vision_config = _BACKBONE_LAYOUTS[_check_backbone(backbone)](
        text_config, hidden_size, head_dim, vision_dim, vision_depth, num_layers
    )
    text_config.update(extra.pop("text", {}))
    vision_config.update(extra.pop("vision", {}))
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **extra,
    )


def _qwen2_vl_layout(text_config, hidden_size, head_dim, vision_dim, vision_depth, num_layers):
    vision_config = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size,
                         num_heads=max(1, vision_dim // 32), mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, in_chans=3)  # fmt: skip
    return Qwen2VLConfig, vision_config


def _qwen2_5_vl_layout(text_config, hidden_size, head_dim, vision_dim, vision_depth, num_layers):
    """Qwen2.5-VL: windowed attention in the vision blocks except the last (the released 7B: windows of 112 px,
    full attention in blocks 7, 15, 23, 31 of 32); here windows of 56 px, so that a 112 px image has four."""
    vision_config = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                         num_heads=max(1, vision_dim // 32), out_hidden_size=hidden_size, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                         fullatt_block_indexes=[vision_depth - 1], in_channels=3)  # fmt: skip
    return Qwen2_5_VLConfig, vision_config


def _qwen3_vl_layout(text_config, hidden_size, head_dim, vision_dim, vision_depth, num_layers):
    """Qwen3-VL: interleaved M-RoPE and an explicit head_dim in the text model; 16 px patches, a learnt position grid
    (8 x 8 here, 48 x 48 released) and deepstack mergers after vision blocks (8, 16, 24 released; every block here,
    at most one per language-model layer) whose features are added to the first language-model layers."""
    text_config.pop("rope_scaling")
    text_config.pop("bos_token_id")
    text_config.pop("eos_token_id")
    text_config.update(head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": text_config.pop("rope_theta"),
        "mrope_section": _mrope_section(head_dim), "mrope_interleaved": True,
    })  # fmt: skip
    vision_config = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                         num_heads=max(1, vision_dim // 32), out_hidden_size=hidden_size, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                         deepstack_visual_indexes=list(range(min(vision_depth, num_layers))), in_channels=3)  # fmt: skip
    return Qwen3VLConfig, vision_config


_BACKBONE_LAYOUTS = {"qwen2_vl": _qwen2_vl_layout, "qwen2_5_vl": _qwen2_5_vl_layout, "qwen3_vl": _qwen3_vl_layout}


def build_tiny_vlm(tokenizer, seed=0, backbone=DEFAULT_BACKBONE, **widths):
    """A randomly initialised tiny VLM of the backbone `model_type` (float32, sdpa attention)."""
    torch.manual_seed(seed)
    config = tiny_vlm_config(tokenizer, backbone=backbone, **widths)
    vlm_class = AutoModelForImageTextToText._model_mapping[type(config)]  # e.g. Qwen3VLForConditionalGeneration
    model = vlm_class._from_config(config, attn_implementation="sdpa").eval()
    text_config = config.get_text_config()
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model


def build_tiny_bundle(labels=MIKELS8, seed=0, head_hidden_sizes=(64,), widths=None, backbone=DEFAULT_BACKBONE,
                      **config_kwargs):
    """(model, processor): a tiny EmoVLM-KD bundle over `labels` on the `backbone` (a `model_type` of BACKBONES)."""
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    processor = build_tiny_processor(backbone=backbone)
    vlm = build_tiny_vlm(processor.tokenizer, seed=seed, backbone=backbone, **(widths or {}))
    torch.manual_seed(seed + 1)
    model = EmoVLMKDForImageClassification.from_vlm(
        vlm, labels, processor=processor, head_hidden_sizes=list(head_hidden_sizes), **config_kwargs
    )
    return model.eval(), processor


def build_tiny_teacher(folder, seed):
    """A small ViT classifier (random init) and its image processor, saved like a Hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=48, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, num_labels=2)
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: the tiny teacher goes into a new or empty folder")
    with staged_folder(folder) as tmp:  # `.NAME.emovlm-kd-PID-TOKEN.tmp`, renamed into place when complete
        ViTForImageClassification(config).save_pretrained(str(tmp))
        ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(str(tmp))
