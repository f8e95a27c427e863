"""Stage 1: instruction tuning with TRL's `SFTTrainer` and LoRA (QLoRA on CUDA); the adapter is merged into the
backbone and saved as `RUN/stage1_sft/merged`.

Images reach the trainer as they reach the model at inference: through `prepare_image` (EXIF orientation, mode,
long side at most `--max-image-side`), with the processor's `max_pixels` lowered to match (saved with it). The
adapter is merged in float32 into a float32 copy of the base's full-precision weights (never the 4-bit ones), then
cast to the run's dtype: a merge in bfloat16 rounds LoRA updates smaller than half a bfloat16 step away.
"""

import dataclasses
import json
import logging
import types
from functools import partial
from pathlib import Path

import torch
from transformers import set_seed

from configuration_emovlm_kd import DEFAULT_MAX_IMAGE_SIDE
from emovlm_kd.distributed import is_main_process
from emovlm_kd.hub import reset_tokenizer_call_state
from emovlm_kd.images import limit_processor_pixels, prepare_image
from emovlm_kd.runtime import resolve_dtype
from emovlm_kd.training.cache import fingerprint, fingerprint_checkpoint, fingerprint_dataset
from emovlm_kd.training.stage import last_checkpoint, run_stage, run_trainer, trained

logger = logging.getLogger(__name__)


def sft_dataset(train, instructions_path, max_side=DEFAULT_MAX_IMAGE_SIDE, chat_format="paper"):
    """TRL's vision prompt/completion format: `images`, `prompt` and `completion` (the loss: `sft_collator`). The
    prompt is `scoring_emovlm_kd.chat_messages` (`chat_format` paper: image then question; official: the official
    system message, then question then image, data_utils.py:37,165-176), the chat the model is asked at inference.

    The images are decoded when a row is read and made ready by `prepare_image(image, max_side=max_side)`, the
    inference path (upright, RGB, long side at most `max_side`, fitted): nothing is decoded or held up front.
    """
    from datasets import Dataset, Image, Sequence

    from scoring_emovlm_kd import chat_messages

    layout = types.SimpleNamespace(chat_format=chat_format)  # what `chat_messages` reads of a config

    raw_images = dict(zip(train["id"], train.cast_column("image", Image(decode=False))["image"]))
    rows = [json.loads(line) for line in Path(instructions_path).read_text(encoding="utf-8").splitlines() if line]
    data = Dataset.from_dict(
        {
            "images": [[raw_images[r["id"]]] for r in rows],
            "prompt": [chat_messages(r["question"], layout) for r in rows],
            "completion": [[{"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]}] for r in rows],
        }
    )
    return data.cast_column("images", Sequence(Image())).with_transform(PreparedImages(max_side))


class PreparedImages:
    """A `datasets` transform: every image of a batch's `images` lists through `prepare_image`."""

    def __init__(self, max_side):
        self.max_side = max_side

    def __call__(self, batch):
        if "images" in batch:
            batch["images"] = [[prepare_image(image, max_side=self.max_side) for image in images]
                               for images in batch["images"]]
        return batch


def model_config(settings):
    """TRL's `ModelConfig` of stage 1: LoRA on the LLM's projections (`--lora-targets`, not the vision tower's), and
    4-bit nf4 double quantisation computing in bfloat16 (QLoRA) when asked, or by default when CUDA is present."""
    from trl import ModelConfig

    targets = "|".join(t.strip() for t in settings.lora_targets.split(",") if t.strip())
    return ModelConfig(
        use_peft=True,
        lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        lora_target_modules=rf".*language_model.*\.({targets})",
        lora_task_type="CAUSAL_LM",
        load_in_4bit=settings.quantize == "4bit" or (settings.quantize == "auto" and torch.cuda.is_available()),
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        dtype="bfloat16",  # read by `get_quantization_config` only (the 4-bit compute dtype); the run's is `--dtype`
    )


class ImageTokensMasked:
    """`sft_loss: all_tokens`, the official collate_fn (train_vlm.py:118-128): TRL's vision collator with the loss on
    every token (`completion_only_loss=False`: padding is already -100), and the image tokens masked too (the
    official code's [151652, 151653, 151655] are Qwen2-VL's vision start, vision end and image pad ids; here read from
    the backbone's config, so that every backbone and the tiny demo model get theirs)."""

    def __init__(self, processor, image_token_ids):
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self.collator = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=False)
        self.image_token_ids = torch.tensor(sorted(set(image_token_ids)))

    def __call__(self, examples):
        batch = self.collator(examples)
        batch["labels"][torch.isin(batch["input_ids"], self.image_token_ids)] = -100
        return batch


def image_token_ids(vlm_config):
    """The ids of the tokens that stand for an image in the backbone's text: vision start/end and image pad."""
    return [getattr(vlm_config, name) for name in ("vision_start_token_id", "vision_end_token_id", "image_token_id")
            if getattr(vlm_config, name, None) is not None]


def sft_collator(sft_loss, processor, vlm_config):
    """None (TRL's own: the loss on the answer only, `sft_loss: answer`) or `ImageTokensMasked` (`all_tokens`)."""
    return ImageTokensMasked(processor, image_token_ids(vlm_config)) if sft_loss == "all_tokens" else None


def tf32_value(asked):
    """What `TrainingArguments.tf32` gets: True where `sft_tf32` asks for it (`asked`) and CUDA has TF32; None (left
    as torch has it) otherwise; TrainingArguments refuses tf32 without it, so that case is logged and left off."""
    if not asked:
        return None
    from transformers.utils import is_torch_tf32_available

    if is_torch_tf32_available():
        return True
    logger.info("[stage 1] tf32 asked (protocol official) but this device has no TF32: left off")
    return None


def sft_arguments(settings, output_dir, seed, dtype, quantized):
    """Stage 1's `SFTStageConfig` (`arguments.training_arguments`) with the run-time values: bf16, gradient
    checkpointing under 4-bit, `tf32_value`."""
    from emovlm_kd.training.arguments import training_arguments

    return training_arguments(settings, output_dir, seed, bf16=dtype == torch.bfloat16,
                              gradient_checkpointing=quantized, tf32=tf32_value(settings.sft_tf32))


def quantization_config(model_cfg, scope="llm"):
    """`trl.get_quantization_config` of stage 1's `model_config` (None without 4-bit), the visual tower and `lm_head`
    left unquantised (TRL's `ModelConfig` has no skip list): 4-bit layers narrower than 64 features fail. `scope`
    (`--quantize-scope`) all: transformers' default skip list, as the official BitsAndBytesConfig
    (train_vlm.py:69-74)."""
    from trl import get_quantization_config

    quant = get_quantization_config(model_cfg)
    if quant is not None and scope != "all":
        quant.llm_int8_skip_modules = ["model.visual", "lm_head"]
    return quant


def run_stage1(settings, run_dir, dataset, vlm_path, instructions_path, *, seed, dtype, max_image_side,
               chat_format="paper"):
    """Instruction-tune the VLM with LoRA (QLoRA on CUDA) by the stage's `SFTArguments` (`settings`), merge the
    adapter, save RUN/stage1_sft/merged; `dtype` is the run's `--dtype`, `chat_format` stage 0's (the chat layout of
    the rows). The work: SFT with LoRA, the adapter saved in RUN/stage1_sft/adapter and merged by the main process
    (`merge_in_float32`)."""
    key = fingerprint(settings.stage, dataclasses.asdict(settings), fingerprint_checkpoint(vlm_path),
                      fingerprint_dataset(dataset["train"]), Path(instructions_path).read_text(encoding="utf-8"),
                      dtype, seed, max_image_side, *(() if chat_format == "paper" else (chat_format,)))

    def work(stage):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import SFTTrainer, get_peft_config

        from emovlm_kd.training.trainers import with_verified_resume

        run_dtype = resolve_dtype(dtype)
        lora = model_config(settings)
        quant = quantization_config(lora, settings.quantize_scope)
        if quant is not None:
            logger.info("[stage 1] QLoRA: loading %s in 4-bit nf4 with double quantisation", vlm_path)
        set_seed(seed)  # LoRA's initialisation draws from the global generator: same start in every process
        processor = AutoProcessor.from_pretrained(vlm_path)
        limit_processor_pixels(processor, max_image_side)  # saved with the merged model, hence with the bundle
        vlm = AutoModelForImageTextToText.from_pretrained(
            vlm_path, dtype=run_dtype, quantization_config=quant, use_safetensors=True
        )
        args = sft_arguments(settings, stage.checkpoints(), seed, run_dtype, quant is not None)
        trainer = with_verified_resume(SFTTrainer)(
            model=vlm,
            args=args,
            train_dataset=sft_dataset(dataset["train"], instructions_path, max_side=max_image_side,
                                      chat_format=chat_format),
            processing_class=processor,
            data_collator=sft_collator(settings.sft_loss, processor, vlm.config),
            peft_config=get_peft_config(lora),
        )
        result = run_trainer(trainer, last_checkpoint(args.output_dir))
        adapter_dir = stage.dir / "adapter"
        trainer.save_model(str(adapter_dir))
        merged = merge_in_float32(vlm_path, adapter_dir, run_dtype) if is_main_process() else None
        return partial(write_merged, merged, processor), trained(result)

    return run_stage(run_dir, "stage1_sft", key, "merged", work,
                     skipped="[stage 1] instruction tuning: done, skipped", log=logger, folder=True)


def merge_in_float32(vlm_path, adapter_dir, dtype):
    """The base checkpoint's weights loaded in float32 (after QLoRA too: the full-precision weights, not the 4-bit
    ones), the adapter in `adapter_dir` merged into them in float32, the result cast to `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype)


def write_merged(merged, processor, folder):
    """The merged model (`merge_in_float32`) and the processor saved in `folder` (the stage's temp folder)."""
    merged.save_pretrained(str(folder))
    reset_tokenizer_call_state(processor)  # tokenizer.json must not depend on the last batch the SFT padded
    processor.save_pretrained(str(folder))
