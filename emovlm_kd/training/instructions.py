"""Stage 0: stage 1's instruction data in the paper's mix (`--instruction-kinds`, by default all three kinds),
written to `RUN/stage0_instructions/instructions.jsonl`:

- categorical: the fixed prompt listing the dataset's classes, the image's label as answer, for every train image;
- conversation ("describe key elements") and reasoning ("describe the process of inferring the emotions"): answers
  from the user's file (`--instructions`) or from an annotator (`--annotator`, see `emovlm_kd.training.annotate`);
  with both, the annotator answers the images the file lacks.

Instruction files, either
- JSONL, one answer a line: `{"id": <the dataset's id>, "kind": "conversation"|"reasoning", "answer": ...}`
  (`question` optional), or
- the official code's annotation JSON (generate_instruction.py): a list of `{"img_path", "gpt_response", "label"}`,
  each response split into its key elements (conversation) and reasoning as the official train_vlm.py does. An
  entry's image is the train id that is the longest tail of its `img_path` (`images/FI/train/awe/awe_1.jpg` finds
  `awe/awe_1.jpg` or `train/awe/awe_1.jpg`); an entry whose label is not the dataset's is left out.

Without conversation/reasoning answers the paper's mix stops the run before any work (`check_instruction_sources`);
`--instruction-kinds categorical` trains on the categorical rows alone. The mix a run used is in RUN/eval_results.json
and the model card (`instruction_mix`).
"""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from emovlm_kd.distributed import is_main_process
from emovlm_kd.training.annotate import annotate_images, parse_annotation
from emovlm_kd.training.cache import atomic_write_text, fingerprint, fingerprint_dataset
from emovlm_kd.training.config import (
    HOW_TO_GET_ANSWERS,
    INSTRUCTION_KINDS,
    check_instruction_sources,
)
from emovlm_kd.training.stage import Stage
from modeling_emovlm_kd import EXPLANATION_QUESTION

logger = logging.getLogger(__name__)

CONVERSATION_QUESTION = "Observe the image and describe key elements of the image."
REASONING_QUESTION = EXPLANATION_QUESTION  # the paper's reasoning instruction; `model.explain` asks it too
QUESTIONS = {"conversation": CONVERSATION_QUESTION, "reasoning": REASONING_QUESTION}


def categorical_instruction(config):
    """The paper's categorical instruction for the labels of `config` (an EmoVLMKDConfig)."""
    return config.classification_prompt()


def answer_rows(image_id, response):
    """The conversation and reasoning rows of one annotator response (key elements, reasoning); [] if it lacks one."""
    parts = parse_annotation(response)
    if parts is None:
        return []
    return [{"id": image_id, "kind": kind, "question": QUESTIONS[kind], "answer": answer}
            for kind, answer in zip(("conversation", "reasoning"), parts)]


def read_instruction_jsonl(path, known_ids):
    """Conversation / reasoning answers from a user JSONL: {"id" (or "path"), "kind", "answer"[, "question"]}."""
    rows, unknown = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            image_id = row.get("id", row.get("path"))
            kind = row.get("kind")
            if kind not in QUESTIONS or not row.get("answer"):
                raise ValueError(f"{path}:{number}: need kind conversation/reasoning and a non-empty answer")
            if image_id not in known_ids:
                unknown.append(image_id)
                continue
            rows.append({"id": image_id, "kind": kind, "question": row.get("question") or QUESTIONS[kind],
                         "answer": row["answer"]})
    _report_left_out(path, unknown, "name images that are not in the train split")
    return rows


def tail_index(ids):
    """{path tail (tuple of components): [ids ending so]} for every tail of every id."""
    index = {}
    for image_id in ids:
        parts = tuple(Path(image_id).parts)
        for start in range(len(parts)):
            index.setdefault(parts[start:], []).append(image_id)
    return index


def match_image(path, index):
    """The id whose path is the longest tail of `path`, None when there is none or the longest is ambiguous."""
    parts = tuple(Path(str(path).replace("\\", "/")).parts)
    for start in range(len(parts)):
        found = index.get(parts[start:])
        if found:
            return found[0] if len(found) == 1 else None
    return None


def read_official_annotations(path, train):
    """Conversation and reasoning rows from the official annotation JSON (a list of {img_path, gpt_response})."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    names = train.features["label"].names
    label_of = dict(zip(train["id"], (names[label] for label in train["label"])))
    index = tail_index(label_of)
    rows, unmatched, relabelled, unparsed = [], [], [], []
    for number, entry in enumerate(entries):
        where = entry.get("img_path") or entry.get("img") if isinstance(entry, dict) else None
        if not where or "gpt_response" not in entry:
            raise ValueError(f"{path}: entry {number} is not an annotation {{img_path, gpt_response}}")
        image_id = match_image(where, index)
        if image_id is None:
            unmatched.append(where)
        elif entry.get("label") is not None and str(entry["label"]).strip().lower() != label_of[image_id]:
            relabelled.append(where)
        else:
            found = answer_rows(image_id, entry["gpt_response"])
            rows += found
            unparsed += [] if found else [where]
    _report_left_out(path, unmatched, "match no train image")
    _report_left_out(path, relabelled, "carry another label than the dataset's")
    _report_left_out(path, unparsed, "have no '1. key elements' and '2. reasoning' sections")
    return rows


def read_instruction_file(path, train):
    """The answers of an instruction file: the official annotation JSON (a JSON list) or our JSONL."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(64).lstrip()
    if head.startswith("["):
        return read_official_annotations(path, train)
    return read_instruction_jsonl(path, set(train["id"]))


def _report_left_out(path, items, why):
    if items:
        shown = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
        logger.warning("%s: %d answer(s) %s, left out: %s", path, len(items), why, shown)


def annotated_rows(cfg, train, have, folder):
    """Rows from the annotator for the train images without answers yet (`have`: ids answered), resumable."""
    missing = [i for i, image_id in enumerate(train["id"]) if image_id not in have]
    if not missing:
        return []
    responses = annotate_images(cfg, train.select(missing), folder / "annotations.jsonl")
    rows = [row for image_id, response in responses.items() for row in answer_rows(image_id, response)]
    _report_left_out(folder / "annotations.jsonl", [i for i, r in responses.items() if not parse_annotation(r)],
                     "have no '1. key elements' and '2. reasoning' sections")
    return rows


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def run_stage0(cfg, run_dir, dataset, bundle_config):
    """instructions.jsonl: the rows of cfg.instruction_kinds, categorical for every train image."""
    check_instruction_sources(cfg)
    train = dataset["train"]
    kinds = list(cfg.instruction_kinds)
    key = fingerprint("stage0", fingerprint_dataset(train), bundle_config.classification_prompt(),
                      bundle_config.answer_template, kinds, file_digest(cfg.instructions), cfg.annotator,
                      cfg.annotator_model)
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
        rows += [r for r in read_instruction_file(cfg.instructions, train) if r["kind"] in kinds]
    if cfg.annotator and is_main_process():
        have = {r["id"] for r in rows if r["kind"] != "categorical"}
        rows += [r for r in annotated_rows(cfg, train, have, stage.dir) if r["kind"] in kinds]
    if is_main_process():
        check_coverage(rows, kinds, len(train))
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = Counter(r["kind"] for r in rows)
    stage.finish(rows=len(rows), **{kind: counts[kind] for kind in INSTRUCTION_KINDS})
    return out


def check_coverage(rows, kinds, num_images):
    """A `ValueError` when a kind of the mix has no answer at all; a warning when it covers part of the images."""
    for kind in kinds:
        covered = len({r["id"] for r in rows if r["kind"] == kind})
        if covered == 0:
            raise ValueError(f"no {kind} answers for any train image; {HOW_TO_GET_ANSWERS}, or leave {kind} out of "
                             "--instruction-kinds")
        if covered < num_images:
            logger.warning("%s answers for %d of %d train images", kind, covered, num_images)


def instruction_mix(path):
    """The rows of each kind in an instructions.jsonl and the train images they cover, logged."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = Counter(r["kind"] for r in rows)
    mix = {kind: counts[kind] for kind in INSTRUCTION_KINDS}
    mix["train_images"] = len({r["id"] for r in rows})
    logger.info("instruction mix: %s rows (%d train images)",
                ", ".join(f"{n} {kind}" for kind, n in mix.items() if kind in INSTRUCTION_KINDS), mix["train_images"])
    return mix
