"""Stage 0: the instruction data. The paper's categorical instruction for every train image, plus conversation and
reasoning answers from the user's JSONL or an annotator, written to `RUN/stage0_instructions/instructions.jsonl`."""

import json
import logging

from emovlm_kd.distributed import is_main_process
from emovlm_kd.training.cache import atomic_write_text, fingerprint, fingerprint_dataset
from emovlm_kd.training.stage import Stage

logger = logging.getLogger(__name__)

CONVERSATION_QUESTION = "Observe the image and describe key elements of the image."
REASONING_QUESTION = "Observe the image and describe the process of inferring the emotions conveyed in the image."


def categorical_instruction(config):
    """The paper's categorical instruction for the labels of `config` (an EmoVLMKDConfig)."""
    return config.classification_prompt()


def read_instruction_jsonl(path, known_ids):
    """Conversation / reasoning answers from a user JSONL: {"id" (or "path"), "kind", "answer"[, "question"]}."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            image_id = row.get("id", row.get("path"))
            kind = row.get("kind")
            if kind not in ("conversation", "reasoning") or not row.get("answer"):
                raise ValueError(f"{path}:{number}: need kind conversation/reasoning and a non-empty answer")
            if image_id not in known_ids:
                logger.warning("%s:%d: image %r is not in the train split; ignored", path, number, image_id)
                continue
            question = row.get("question") or (CONVERSATION_QUESTION if kind == "conversation" else REASONING_QUESTION)
            rows.append({"id": image_id, "kind": kind, "question": question, "answer": row["answer"]})
    return rows


def run_stage0(cfg, run_dir, dataset, bundle_config):
    """instructions.jsonl: categorical rows for every train image plus conversation/reasoning rows."""
    from emovlm_kd.training.annotate import annotate_split

    train = dataset["train"]
    key = fingerprint("stage0", fingerprint_dataset(train), bundle_config.classification_prompt(),
                      bundle_config.answer_template, cfg.instructions, cfg.annotator, cfg.annotator_model)
    stage = Stage(run_dir, "stage0_instructions", key)
    out = stage.dir / "instructions.jsonl"
    if stage.done:
        logger.info("[stage 0] instruction data: done, skipped")
        return out
    question = categorical_instruction(bundle_config)
    names = train.features["label"].names
    rows = [
        {"id": image_id, "kind": "categorical", "question": question, "answer": bundle_config.answer_for(names[label])}
        for image_id, label in zip(train["id"], train["label"])
    ]
    if cfg.instructions:
        rows += read_instruction_jsonl(cfg.instructions, set(train["id"]))
    if cfg.annotator and is_main_process():
        rows += annotate_split(cfg, train, stage.dir / "annotations.jsonl", [CONVERSATION_QUESTION, REASONING_QUESTION])
    if is_main_process():
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("categorical", "conversation", "reasoning")}
    stage.finish(rows=len(rows), **kinds)
    return out
