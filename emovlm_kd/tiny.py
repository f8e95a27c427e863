"""Tiny Qwen2-VL models, tokenizers and processors built offline in seconds (tests, `emovlm-kd tiny`, the demo).

Everything is seeded: the same arguments give the same bytes on disk.
"""

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

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


def build_tiny_processor(tokenizer=None, min_pixels=56 * 56, max_pixels=112 * 112):
    """A Qwen2-VL processor on the tiny tokenizer; images are resized to 4-64 patches (1-16 LLM tokens)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_vlm_config(tokenizer, hidden_size=64, num_layers=2, num_heads=2, vision_dim=64, vision_depth=2, **extra):
    """A Qwen2-VL config of the given widths (multiples of 64 keep 4-bit quantisation usable)."""
    head_dim = hidden_size // num_heads
    section = head_dim // 2
    mrope = [section - 2 * (section // 3), section // 3, section // 3]
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
        rope_scaling={"type": "mrope", "mrope_section": mrope},
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    text_config.update(extra.pop("text", {}))
    vision_config = dict(
        depth=vision_depth,
        embed_dim=vision_dim,
        hidden_size=hidden_size,
        num_heads=max(1, vision_dim // 32),
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_chans=3,
    )
    vision_config.update(extra.pop("vision", {}))
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **extra,
    )


def build_tiny_vlm(tokenizer, seed=0, **widths):
    """A randomly initialised tiny Qwen2-VL (float32, sdpa attention)."""
    torch.manual_seed(seed)
    config = tiny_vlm_config(tokenizer, **widths)
    model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def build_tiny_bundle(labels=MIKELS8, seed=0, head_hidden_sizes=(64,), widths=None, **config_kwargs):
    """(model, processor): a tiny EmoVLM-KD bundle over `labels`, built offline."""
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    processor = build_tiny_processor()
    vlm = build_tiny_vlm(processor.tokenizer, seed=seed, **(widths or {}))
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
    tmp = folder.with_name(folder.name + ".tmp")
    ViTForImageClassification(config).save_pretrained(str(tmp))
    ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(str(tmp))
    tmp.rename(folder)
