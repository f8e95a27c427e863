"""Frozen outputs computed once per image and cached: the bundle's pooled visual features and label
log-likelihoods (one batched pass), sharded over processes."""

import logging

from emovlm_kd import protocol as protocols
from emovlm_kd.distributed import (
    barrier,
    is_main_process,
    main_process_decides,
    map_sharded,
)
from emovlm_kd.images import prepare_image
from emovlm_kd.training.cache import (
    fingerprint,
    fingerprint_dataset,
    fingerprint_module,
)

logger = logging.getLogger(__name__)


def vlm_pass_cache(cache, model, processor, split, split_name, *, batch_size):
    """One batched pass per image through the frozen bundle: pooled visual features + label log-likelihoods."""
    from emovlm_kd.inference import PromptPrefixCache, run_batch

    max_side = model.config.max_image_side  # the model's image size, as at inference
    key = fingerprint("vlm_pass", fingerprint_module(model.vlm), fingerprint_dataset(split),
                      model.config.classification_prompt(), model.config.label_answer_token_ids, max_side,
                      processor.image_processor.size["longest_edge"], *protocols.config_changes(model.config))

    prompt_cache = PromptPrefixCache()  # sound: the bundle is frozen for the whole pass

    def compute_batch(indices):
        images = [prepare_image(split[i]["image"], max_side=max_side) for i in indices]
        output = run_batch(model, processor, images, vlm_mode="score", prompt_cache=prompt_cache)
        return {"image_embeds": output.image_embeds, "vlm_log_likelihoods": output.vlm_log_likelihoods}

    return cached_map(cache, f"vlm_pass-{split_name}", key, len(split), batch_size, compute_batch,
                      desc=f"VLM pass ({split_name})")


def cached_map(cache, name, key, length, batch_size, compute_batch, desc):
    """`compute_batch` over all rows (sharded across processes), concatenated, cached under name+key."""
    if main_process_decides(lambda: cache.path(name, key).exists()):
        return cache.get(name, key)
    tensors = map_sharded(compute_batch, length, batch_size, desc=desc)  # every process gets all rows
    if is_main_process():
        cache.put(name, key, tensors)
    barrier()
    return tensors
