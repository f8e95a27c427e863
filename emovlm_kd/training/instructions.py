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

A file that is not one of these (a line that is not JSON or not an object, a field of the wrong type) is refused
before any work (`instruction_file_problem`, called by the preflight) in one line naming the file and the line (JSONL)
or the entry (JSON): `InstructionFileError`, a `ValueError` (exit 2 through the CLI).

Without conversation/reasoning answers the paper's mix stops the run before any work (`check_instruction_sources`);
`--instruction-kinds categorical` trains on the categorical rows alone. The mix a run used is in RUN/eval_results.json
and the model card (`instruction_mix`).
"""

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from emovlm_kd.distributed import is_main_process
from emovlm_kd.errors import InputError, few
from emovlm_kd.training.annotate import annotate_images, parse_annotation
from emovlm_kd.training.cache import fingerprint, fingerprint_dataset
from emovlm_kd.training.config import HOW_TO_GET_ANSWERS, INSTRUCTION_KINDS
from emovlm_kd.training.stage import run_stage
from scoring_emovlm_kd import EXPLANATION_QUESTION

logger = logging.getLogger(__name__)

CONVERSATION_QUESTION = "Observe the image and describe key elements of the image."
REASONING_QUESTION = EXPLANATION_QUESTION  # the paper's reasoning instruction; `model.explain` asks it too
QUESTIONS = {"conversation": CONVERSATION_QUESTION, "reasoning": REASONING_QUESTION}
# `chat_format: official`: the questions of the official train_vlm.py:20-33 (OBS_TASK_MESSAGE, INF_TASK_MESSAGE), each
# the paper's question followed by an "Example: ..." passage
OFFICIAL_QUESTIONS = {
    "conversation": CONVERSATION_QUESTION + " Example: The dark sky serves as a dramatic background, emphasizing "
    "people holding tools. Objects resembling agricultural tools appear threatening, creating tension. The "
    "synchronized movement of the crowd and strong silhouette effects contribute to a striking atmosphere. The high "
    "contrast highlights the shapes of the tools as primary visual elements.",
    "reasoning": REASONING_QUESTION + " Example: The crowd holding various tools suggests intense energy and the "
    "excitement of collective action. The silhouette contrasting with the dark sky evokes tension, potentially "
    "eliciting anxiety or fear. The threatening shapes of the tools and the collective behavior may hint at anger or "
    "hostility. The overall scene's organized yet uncertain atmosphere limits the possibility of comfort.",
}


def questions_for(chat_format):
    """The conversation/reasoning questions of a `chat_format` (paper: the paper's; official: with their examples)."""
    return OFFICIAL_QUESTIONS if chat_format == "official" else QUESTIONS


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


JSONL_ROW = '{"id", "kind": "conversation"|"reasoning", "answer"}'
OFFICIAL_ENTRY = '{"img_path", "gpt_response", "label"}'


class InstructionFileError(InputError):
    """An instruction file that cannot be used, in one line: `FILE:LINE: what is wrong` (JSONL) or
    `FILE: entry [N]: what is wrong` (the official JSON's list index, from 0), with how many other rows are wrong;
    a `ValueError`."""


def _a(value):
    """What a JSON value is, for a message: 'a list', 'a number', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _got(row, key):
    """The value of `row[key]` described for a message ('missing' when absent)."""
    return _a(row[key]) if key in row else "missing"


def _jsonl_row_problem(row):
    """What is wrong with one parsed JSONL row, or None."""
    if not isinstance(row, dict):
        return f"{_a(row)}, not an object {JSONL_ROW}"
    key = "id" if "id" in row or "path" not in row else "path"
    if not isinstance(row.get(key), str) or not row[key].strip():
        return f'"{key}" must be the image\'s id in the dataset, a string such as "awe/awe_1.jpg"; got {_got(row, key)}'
    if row.get("kind") not in QUESTIONS:
        return f'"kind" must be "conversation" or "reasoning", got {row.get("kind")!r}'
    if not isinstance(row.get("answer"), str) or not row["answer"].strip():
        return f'"answer" must be a non-empty string, got {_got(row, "answer")}'
    if row.get("question") is not None and not isinstance(row["question"], str):
        return f'"question" must be a string when given, got {_a(row["question"])}'
    return None


def _official_entry_problem(entry):
    """What is wrong with one entry of the official annotation JSON, or None."""
    if not isinstance(entry, dict):
        return f"{_a(entry)}, not an annotation {OFFICIAL_ENTRY}"
    key = "img_path" if entry.get("img_path") or not entry.get("img") else "img"
    if not isinstance(entry.get(key), str) or not entry[key].strip():
        return f'"{key}" must be the image\'s path, a string; got {_got(entry, key)}'
    if not isinstance(entry.get("gpt_response"), str):
        return f'"gpt_response" must be the annotator\'s answer, a string; got {_got(entry, "gpt_response")}'
    if entry.get("label") is not None and not isinstance(entry["label"], str):
        return f'"label" must be a string when given, got {_a(entry["label"])}'
    return None


def _refuse(path, where, problems):
    """`InstructionFileError` for the first of `problems` ([(line or entry, what)]), counting the others."""
    (first, what), more = problems[0], len(problems) - 1
    unit = "line" if where == "line" else "entry"
    place = f"{path}:{first}" if where == "line" else f"{path}: entry [{first}]"
    also = ""
    if more:
        following = problems[1][0] if where == "line" else f"[{problems[1][0]}]"
        also = f" ({more} more bad {unit}{'s' if more > 1 else ''}, the next at {unit} {following})"
    return InstructionFileError(f"{place}: {what}{also}")


def load_instruction_file(path):
    """`("jsonl", [(line number, row)])` or `("official", [(entry index, entry)])`, every row checked for its shape
    (not against the dataset); `InstructionFileError` in one line naming the file and the first bad line or entry.
    The official JSON is a list; a file that starts with `[` but holds one JSON value a line is JSONL."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InstructionFileError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x}); save the file as "
                                   "UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": a JSON value per line, JSONL
                raise InstructionFileError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column "
                                           f"{error.colno})") from None
        else:
            problems = [(i, what) for i, entry in enumerate(entries) if (what := _official_entry_problem(entry))]
            if problems:
                raise _refuse(path, "entry", problems)
            return "official", list(enumerate(entries))
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((number, f"not JSON ({error.msg} at column {error.colno}); each line must be an object "
                                     f"{JSONL_ROW}"))
            continue
        what = _jsonl_row_problem(row)
        if what:
            problems.append((number, what))
        else:
            rows.append((number, row))
    if problems:
        raise _refuse(path, "line", problems)
    return "jsonl", rows


def instruction_file_problem(path):
    """One line saying what makes the instruction file at `path` unusable, or None (the preflight's check)."""
    try:
        load_instruction_file(path)
    except InstructionFileError as error:
        return str(error)
    except OSError as error:
        return f"{path}: cannot be read ({error.strerror or error})"
    return None


def read_instruction_jsonl(path, known_ids, rows=None):
    """Conversation / reasoning answers from a user JSONL: {"id" (or "path"), "kind", "answer"[, "question"]}."""
    if rows is None:
        rows = load_instruction_file(path)[1]
    answers, unknown = [], []
    for _, row in rows:
        image_id, kind = row.get("id", row.get("path")), row["kind"]
        if image_id not in known_ids:
            unknown.append(image_id)
            continue
        answers.append({"id": image_id, "kind": kind, "question": row.get("question") or QUESTIONS[kind],
                        "answer": row["answer"]})
    _report_left_out(path, unknown, "name images that are not in the train split")
    return answers


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


def read_official_annotations(path, train, entries=None):
    """Conversation and reasoning rows from the official annotation JSON (a list of {img_path, gpt_response})."""
    if entries is None:
        kind, entries = load_instruction_file(path)
        if kind != "official":
            raise InstructionFileError(f"{path}: not the official annotation JSON (a list of {OFFICIAL_ENTRY})")
    names = train.features["label"].names
    label_of = dict(zip(train["id"], (names[label] for label in train["label"])))
    index = tail_index(label_of)
    rows, unmatched, relabelled, unparsed = [], [], [], []
    for _, entry in entries:
        where = entry.get("img_path") or entry.get("img")
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
    """The answers of an instruction file: the official annotation JSON (a JSON list) or our JSONL
    (`InstructionFileError` naming the file and the line or entry when it is neither)."""
    kind, rows = load_instruction_file(path)
    if kind == "official":
        return read_official_annotations(path, train, rows)
    return read_instruction_jsonl(path, set(train["id"]), rows)


def _report_left_out(path, items, why):
    if items:
        logger.warning("%s: %d answer(s) %s, left out: %s", path, len(items), why, few(items))


def annotated_rows(settings, train, have, folder):
    """Rows from the annotator for the train images without answers yet (`have`: ids answered), resumable."""
    missing = [i for i, image_id in enumerate(train["id"]) if image_id not in have]
    if not missing:
        return []
    responses = annotate_images(settings, train.select(missing), folder / "annotations.jsonl")
    rows = [row for image_id, response in responses.items() for row in answer_rows(image_id, response)]
    _report_left_out(folder / "annotations.jsonl", [i for i, r in responses.items() if not parse_annotation(r)],
                     "have no '1. key elements' and '2. reasoning' sections")
    return rows


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def run_stage0(settings, run_dir, dataset, bundle_config):
    """instructions.jsonl: the rows of the kinds of `settings` (the stage's `InstructionArguments`), categorical for
    every train image. The run checked its answer sources before any work (`config.check_instruction_sources`)."""
    train = dataset["train"]
    kinds = list(settings.instruction_kinds)
    key = fingerprint(settings.stage, dataclasses.asdict(settings), fingerprint_dataset(train),
                      bundle_config.classification_prompt(), bundle_config.answer_template,
                      file_digest(settings.instructions))

    def work(stage):
        question = categorical_instruction(bundle_config)
        names = train.features["label"].names
        rows = [{"id": image_id, "kind": "categorical", "question": question,
                 "answer": bundle_config.answer_for(names[label])}
                for image_id, label in zip(train["id"], train["label"])]
        if settings.instructions:
            rows += [r for r in read_instruction_file(settings.instructions, train) if r["kind"] in kinds]
        if settings.annotator and is_main_process():
            have = {r["id"] for r in rows if r["kind"] != "categorical"}
            rows += [r for r in annotated_rows(settings, train, have, stage.dir) if r["kind"] in kinds]
        if settings.chat_format == "official":  # the official questions where a row asks the paper's
            official = questions_for("official")
            rows = [{**r, "question": official[r["kind"]]} if r.get("question") == QUESTIONS.get(r["kind"]) else r
                    for r in rows]
        if is_main_process():
            check_coverage(rows, kinds, len(train))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        counts = Counter(r["kind"] for r in rows)
        summary = dict(rows=len(rows), **{kind: counts[kind] for kind in INSTRUCTION_KINDS})
        return (lambda tmp: Path(tmp).write_text(text, encoding="utf-8")), summary

    return run_stage(run_dir, "stage0_instructions", key, "instructions.jsonl", work,
                     skipped="[stage 0] instruction data: done, skipped", log=logger)


def check_coverage(rows, kinds, num_images):
    """An `InputError` when a kind of the mix has no answer at all; a warning when it covers part of the images."""
    for kind in kinds:
        covered = len({r["id"] for r in rows if r["kind"] == kind})
        if covered == 0:
            raise InputError(f"no {kind} answers for any train image; {HOW_TO_GET_ANSWERS}, or leave {kind} out of "
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
