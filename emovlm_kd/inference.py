"""Batched inference shared by `predict`, `evaluate` and the training stages, and its sharding over the processes of
a `torchrun` / `accelerate launch` (`sharded_batches` + `gather_in_order`; in one process both are plain loops)."""

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline_emovlm_kd import prepare_image, prepare_inputs
from scoring_emovlm_kd import PromptPrefixCache

if TYPE_CHECKING:  # annotations only
    from transformers import BatchFeature, ProcessorMixin

    from modeling_emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDOutput

__all__ = ["NON_FINITE_ERROR", "PromptPrefixCache", "describe", "finite_rows", "gather_in_order", "limit_images",
           "model_inputs", "predict_files", "processor_inputs", "run_batch", "sharded_batches", "to_model"]

logger = logging.getLogger(__name__)


def limit_images(images: Sequence[Any], max_side: int | None) -> list[Any]:
    """`images` with any whose long side exceeds `max_side` passed through `prepare_image(..., max_side)`: callers
    prepare images with the model's bound themselves; this keeps one that forgot from reaching the processor at a
    larger size."""
    if max_side is None:
        return list(images)
    over = {i for i, image in enumerate(images) if max(image.size) > max_side}
    if over:
        logger.debug("%d image(s) over the long-side limit of %d px scaled down", len(over), max_side)
    return [prepare_image(image, max_side=max_side) if i in over else image for i, image in enumerate(images)]


def model_inputs(
    model: "EmoVLMKDForImageClassification", processor: "ProcessorMixin", images: Sequence[Any]
) -> "BatchFeature":
    """The model's inputs for prepared RGB images: the classification prompt and the images through the processor
    (left padded; images over `max_image_side` scaled down, `limit_images`), on the model's device, pixels in its
    dtype."""
    return to_model(model, processor_inputs(processor, model.config, images))


def processor_inputs(processor: "ProcessorMixin", config: Any, images: Sequence[Any]) -> "BatchFeature":
    """`model_inputs` on the CPU, without the model: what a `DataLoader` worker builds (`emovlm_kd.datapath`)."""
    return prepare_inputs(processor, config, limit_images(images, getattr(config, "max_image_side", None)))


def to_model(
    model: "EmoVLMKDForImageClassification", inputs: Any, non_blocking: bool = False
) -> "BatchFeature":
    """`processor_inputs`' tensors on the model's device, pixels in its dtype (`non_blocking`: from pinned memory);
    any model with a `device` and a `dtype` (evaluate's teacher too)."""
    from transformers import BatchFeature

    inputs = BatchFeature({key: value.to(model.device, non_blocking=non_blocking) if torch.is_tensor(value) else value
                           for key, value in inputs.items()})
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.inference_mode()
def run_batch(
    model: "EmoVLMKDForImageClassification",
    processor: "ProcessorMixin",
    images: Sequence[Any],
    vlm_mode: str | None = None,
    prompt_cache: PromptPrefixCache | None = None,
    explain: bool = False,
    generation_kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
    inputs: Any = None,
) -> "EmoVLMKDOutput":
    """Model outputs for a list of prepared RGB PIL images (one prompt each), moved to the CPU as float32.

    `vlm_mode` (default `model.config.vlm_mode`): `score` runs `model(...)`; `generate` runs `model.generate_labels`
    with the processor's tokenizer (answers decoded into `generated_text`). `prompt_cache`: a `PromptPrefixCache`
    that a loop over a frozen model creates once and passes to every call (score mode), so that the prompt's shared
    text prefix is encoded once per run. Images longer than `model.config.max_image_side` are scaled down first
    (`limit_images`). `explain`: `model.explain` instead (the same outputs plus `explanations`, generated with
    `generation_kwargs` and `seed`, from the same encoded images). `inputs`: `processor_inputs` of the images built
    elsewhere (a `DataLoader` worker; pinned on CUDA), used instead of `images` and moved here without blocking.
    """
    if inputs is None:
        inputs = model_inputs(model, processor, images)
    else:
        inputs = to_model(model, inputs, non_blocking=True)
    if explain:
        output = model.explain(**inputs, processor=processor, vlm_mode=vlm_mode, generation_kwargs=generation_kwargs,
                               seed=seed, prompt_cache=prompt_cache)
    elif (vlm_mode or model.config.vlm_mode) == "generate":
        output = model.generate_labels(**inputs, tokenizer=processor.tokenizer)
    else:
        output = model(**inputs, vlm_mode="score", prompt_cache=prompt_cache)
    for key in ("logits", "distill_logits", "vlm_scores", "vlm_log_likelihoods", "image_embeds"):
        if output.get(key) is not None:
            output[key] = output[key].detach().float().cpu()
    if output.get("vlm_answer_found") is not None:
        output["vlm_answer_found"] = output["vlm_answer_found"].cpu()
    return output


def describe(output: "EmoVLMKDOutput", index: int, id2label: dict[int, str]) -> dict[str, Any]:
    """One sample's prediction as a JSON-ready dict: the final answer and what each branch said."""
    probs = output.logits[index].softmax(-1)
    head = output.distill_logits[index].softmax(-1)
    vlm = output.vlm_scores[index]
    best = int(probs.argmax())
    found = bool(output.vlm_answer_found[index])
    record = {
        "label": id2label[best],
        "score": round(float(probs[best]), 6),
        "scores": {id2label[i]: round(float(p), 6) for i, p in enumerate(probs)},
        "vlm": {
            "label": id2label[int(vlm.argmax())] if found else None,
            "scores": {id2label[i]: round(float(p), 6) for i, p in enumerate(vlm)},
        },
        "distill": {
            "label": id2label[int(head.argmax())],
            "score": round(float(head.max()), 6),
            "scores": {id2label[i]: round(float(p), 6) for i, p in enumerate(head)},
        },
    }
    if output.get("generated_text") is not None:
        record["vlm"]["answer"] = output.generated_text[index]
    if output.get("explanations") is not None:
        record["explanation"] = output.explanations[index]
    return record


def predict_files(
    model: "EmoVLMKDForImageClassification",
    processor: "ProcessorMixin",
    sources: Sequence[Any],
    load: Callable[[Any], Any],
    prompt_cache: PromptPrefixCache | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One record per source, in order: `describe`'s prediction of the image `load(source)` gives, or `{"error":
    message}` where `load` raises `ImageLoadError` (the other images of the batch are predicted all the same). One
    `run_batch` for the readable images, with `prompt_cache` and `options` (`vlm_mode`, `explain`...). What `predict`
    writes per file and the demo's batch tab shows."""
    from emovlm_kd.images import ImageLoadError

    records, images, slots = [], [], []
    for source in sources:
        try:
            images.append(load(source))
            slots.append(len(records))
            records.append({})
        except ImageLoadError as error:
            records.append({"error": str(error)})
    if images:
        output = run_batch(model, processor, images, prompt_cache=prompt_cache, **options)
        finite = finite_rows(output)
        for i, slot in enumerate(slots):
            records[slot] = (describe(output, i, model.config.id2label) if finite[i] else
                             {"error": NON_FINITE_ERROR})
    return records


NON_FINITE_ERROR = "the model gave non-finite scores (NaN or infinity) for this image"


def finite_rows(output: "EmoVLMKDOutput") -> list[bool]:
    """Per image of `run_batch`'s output: whether its gate logits, head logits and VLM scores are all finite (a
    record with a NaN would be neither a prediction nor valid JSON)."""
    finite = torch.ones(output.logits.shape[0], dtype=torch.bool)
    for key in ("logits", "distill_logits", "vlm_scores"):
        if output.get(key) is not None:
            finite &= torch.isfinite(output[key]).reshape(output[key].shape[0], -1).all(-1)
    return finite.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------------------------


def sharded_batches(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Yield, round by round, this process's share of the next `batch_size * processes` of `items`: a contiguous
    slice of at most `batch_size` (accelerate's `split_between_processes`, no padding; possibly empty in the last
    round). Every process yields the same number of rounds, so a collective per round (`gather_in_order`) is safe;
    the shares of one round, in rank order, are that round's items in order. In one process: `items` in batches."""
    from emovlm_kd import distributed

    state = distributed.state()
    items = list(items)
    step = batch_size * state.num_processes
    for start in range(0, len(items), step):
        with state.split_between_processes(items[start : start + step]) as mine:
            yield list(mine)


def gather_in_order(local: Sequence[Any]) -> list[Any]:
    """Every process's list `local` of one round of `sharded_batches`, concatenated in rank order (the round's input
    order), on every process (`accelerate.utils.gather_object`); in one process `local` itself."""
    from emovlm_kd import distributed

    if distributed.world_size() == 1:
        return list(local)
    from accelerate.utils import gather_object

    return gather_object(list(local))
