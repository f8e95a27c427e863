"""Conversation and reasoning answers written by an annotator model (stage 0), resumable.

`--annotator openai --annotator-url URL --annotator-model NAME`: any OpenAI-compatible chat endpoint; the key comes
only from the environment (`EMOVLM_KD_API_KEY`, else `OPENAI_API_KEY`) and is never logged or written.
`--annotator PATH_OR_ID`: a local transformers VLM (`AutoModelForImageTextToText`).

The default request follows the official code (generate_instruction.py, prompt_template.txt): one call per image,
given the dataset's categories and the image's label, asked for "1. key elements" and "2. reasoning" without naming
the label; `parse_annotation` splits the response into the conversation answer (the key elements) and the
reasoning answer. The official annotation JSON (`img_path`, `gpt_response`) is read by the same parser
(`emovlm_kd.training.instructions`). Responses are appended to a JSONL file as they come; a rerun skips the images
already answered.

Transient failures of the endpoint (a refused or dropped connection, a timeout, HTTP 408/429/500/502/503/504) are
retried with exponential backoff (`RetryPolicy`: 5 attempts, waiting 2, 4, 8, 16 s; a `Retry-After` header is waited
for instead, up to 120 s); then, or at once for any other HTTP error, an `AnnotatorError` names the endpoint and
what went wrong. The answers written before it stay, so a rerun continues from there.
"""

import base64
import email.utils
import http.client
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from emovlm_kd.errors import InputError
from emovlm_kd.images import prepare_image

logger = logging.getLogger(__name__)

API_KEY_VARIABLES = ("EMOVLM_KD_API_KEY", "OPENAI_API_KEY")
KINDS = {0: "conversation", 1: "reasoning"}

# The official request (prompt_template.txt and the system prompt of generate_instruction.py) in our words, with the
# dataset's own categories and the paper's example answer (section 3.2): one call for both answers, the label given
# as information, the answer told not to name it. The system sentence opens the user text (one message per call).
EXAMPLE_KEY_ELEMENTS = (
    "The image features a golden retriever with soft, relaxed fur, lying on green grass. The dog's expression appears "
    "calm, with slightly drooping eyelids and a gentle posture. The natural setting contributes to an overall sense "
    "of warmth and serene familiarity."
)
EXAMPLE_REASONING = (
    "The dog's relaxed and calm demeanor indicates a state of peace and comfort. Its soft fur and gentle expression "
    "evoke feelings of warmth and affection. The lush green grass enhances the peaceful nature of the scene."
)
ANNOTATION_TEMPLATE = "\n".join([
    "You are an expert in analysing the emotions that images evoke.",
    "",
    "Describe the key elements of this image, then the reasoning by which its emotion can be inferred from them.",
    "",
    "The emotion the image evokes is one of these {count} categories: {categories}.",
    "Emotion information for this image: {label}",
    "",
    "Ground both parts in what is visible in the image, in elements that could lead a viewer to this emotion.",
    "Do not name the emotion category itself anywhere in your answer.",
    "",
    "Answer in exactly this format:",
    "",
    "1. key elements",
    EXAMPLE_KEY_ELEMENTS.replace("{", "{{"),
    "",
    "2. reasoning",
    EXAMPLE_REASONING.replace("{", "{{"),
])

# "1. key elements ... 2. reasoning ...", with or without Markdown emphasis, headings or colons.
_SECTIONS = re.compile(
    r"1\s*[.)]\s*[*_#\s]*key\s+elements?[*_:\s]*(?P<key>.*?)"
    r"\n[\s*_#]*2\s*[.)]\s*[*_#\s]*reasoning[*_:\s]*(?P<reasoning>.*)",
    re.IGNORECASE | re.DOTALL,
)


# `annotator_prompt: official`: the official prompt_template.txt (github sange1104/EmoVLM-KD at fdffa10) as it is,
# the 8 Mikels labels for every dataset (Emotion6, Flickr and Instagram included), `{emotion}` the image's label
# (generate_instruction.py:17-21). Its system message (generate_instruction.py:34) is not sent: our annotators take
# one user message.
OFFICIAL_ANNOTATION_TEMPLATE = "\n".join([
    "Write about the key elements of an image and the reasoning process behind inferring emotions based on the image "
    "and emotional information.",
    "",
    "The emotional information corresponds to the emotion category that best matches the image among the following 8 "
    "categories:",
    "",
    "amusement, excitement, sadness, fear, contentment, anger, disgust, awe",
    "",
    "Base your response on the elements of the image that could lead to inferring this emotional information.",
    "",
    "Do not include the correct emotion category in your response. Instead, describe the key elements of the image "
    "and the reasoning process that could lead to the emotional inference.",
    "",
    "==Emotion Information==",
    "{emotion}",
    "==",
    "",
    "Please follow this format in your response:",
    "",
    "1. key elements ",
    "The dark sky serves as a dramatic background, emphasizing people holding tools. Objects resembling agricultural "
    "tools appear threatening, creating tension. The synchronized movement of the crowd and strong silhouette "
    "effects contribute to a striking atmosphere. The high contrast highlights the shapes of the tools as primary "
    "visual elements.",
    "",
    "2. reasoning",
    "The crowd holding various tools suggests intense energy and the excitement of collective action. The silhouette "
    "contrasting with the dark sky evokes tension, potentially eliciting anxiety or fear. The threatening shapes of "
    "the tools and the collective behavior may hint at anger or hostility. The overall scene's organized yet "
    "uncertain atmosphere limits the possibility of comfort. There are no elements that evoke laughter or awe "
    "directly; the primary mood is one of focused energy and intensity.",
])


def annotation_prompt(label, labels, style="paper"):
    """The request for one image of class `label` among the dataset's `labels`: ours (`paper`, the official request
    in our words with the dataset's labels) or the official prompt_template.txt (`official`)."""
    if style == "official":
        return OFFICIAL_ANNOTATION_TEMPLATE.format(emotion=label)
    return ANNOTATION_TEMPLATE.format(count=len(labels), categories=", ".join(labels), label=label)


def parse_annotation(text):
    """`(key_elements, reasoning)` from an annotator's response, or None when it lacks either section (or is not
    text)."""
    match = _SECTIONS.search(text) if isinstance(text, str) else None
    if not match:
        return None
    key, reasoning = match.group("key").strip(), match.group("reasoning").strip()
    return (key, reasoning) if key and reasoning else None


def annotation_request(question, label):
    """A single-question request (`annotate_split`): the question, with the label as a hint (as EmoVIT)."""
    return (
        f"{question} The image is annotated with the emotion '{label}'. Write two to four sentences that ground "
        "the answer in visible elements of the image."
    )


def api_key():
    for name in API_KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    raise InputError(f"--annotator openai needs an API key in the environment ({' or '.join(API_KEY_VARIABLES)})")


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class AnnotatorError(RuntimeError):
    """The annotator endpoint failed for good: retries exhausted, or an answer no retry changes (401, 404...)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries per request in all; after failure k (0-based) wait `base_delay * 2**k` seconds, or the
    server's `Retry-After`, never more than `max_delay`."""

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 120.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"delays must be >= 0, got base_delay={self.base_delay}, max_delay={self.max_delay}")

    def delay(self, failure, retry_after=None):
        """Seconds to wait after failed attempt number `failure` (0-based)."""
        wanted = retry_after if retry_after is not None else self.base_delay * 2**failure
        return min(max(wanted, 0.0), self.max_delay)


def retry_after_seconds(value, now=None):
    """A `Retry-After` header value (delay-seconds or an HTTP date) as seconds from `now`, or None if absent/bad."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - (now or datetime.now(UTC))).total_seconds()


class OpenAIChatAnnotator:
    """Calls `{url}/chat/completions` with the image as a data URL; transient failures are retried per `retry`,
    waiting with `sleep` (injectable for tests)."""

    def __init__(self, url, model, timeout=120, retry=None, sleep=time.sleep):
        if not url or not model:
            raise InputError("--annotator openai needs --annotator-url and --annotator-model")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self._key = model, timeout, api_key()
        self.retry, self._sleep = retry or RetryPolicy(), sleep

    def __repr__(self):  # never show the key
        return f"OpenAIChatAnnotator(url={self.url!r}, model={self.model!r})"

    def __call__(self, image, text):
        payload = self._post_with_retries(json.dumps(self._request_body(image, text)).encode())
        try:
            return payload["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise AnnotatorError(
                f"the annotator endpoint {self.url} answered without choices[0].message.content: {str(payload)[:200]}"
            ) from None

    def _request_body(self, image, text):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": text}]}],
            "temperature": 0.2,
        }

    def _post(self, data):
        """One attempt: the endpoint's JSON answer to `data`."""
        request = urllib.request.Request(
            self.url, data=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = response.read()
        try:
            return json.loads(body)
        except ValueError:
            raise AnnotatorError(f"the annotator endpoint {self.url} answered non-JSON: {body[:200]!r}") from None

    def _post_with_retries(self, data):
        """`_post(data)`, retried per `self.retry` on transient failures; `AnnotatorError` when they run out."""
        attempts = self.retry.attempts
        for attempt in range(attempts):
            try:
                return self._post(data)
            except TRANSIENT_ERRORS as error:
                failure, retry_after = self._transient_failure(error)
            if attempt + 1 < attempts:
                delay = self.retry.delay(attempt, retry_after)
                logger.warning("annotator endpoint %s: %s; retry %d of %d in %.1f s",
                               self.url, failure, attempt + 1, attempts - 1, delay)  # fmt: skip
                self._sleep(delay)
        raise AnnotatorError(
            f"the annotator endpoint {self.url} failed {attempts} time(s), last: {failure}. "
            "The answers received so far are kept: run again to continue"
        )

    def _transient_failure(self, error):
        """`(what failed, Retry-After seconds or None)` for a failure worth retrying; `AnnotatorError` otherwise."""
        if isinstance(error, urllib.error.HTTPError):
            status, body = f"HTTP {error.code} {error.reason}", _error_body(error)
            if error.code not in RETRY_STATUSES:
                raise AnnotatorError(f"the annotator endpoint {self.url} answered {status}: {body}") from None
            return status, retry_after_seconds(error.headers.get("Retry-After"))
        if isinstance(error, urllib.error.URLError):
            return f"{error.reason}", None
        return f"{type(error).__name__}: {error}", None


def _error_body(error):
    """The first 200 characters of an HTTP error's body ('' if it cannot be read); the error's response is closed."""
    try:
        return error.read().decode("utf-8", errors="replace")[:200]
    except (OSError, ValueError, AttributeError, http.client.HTTPException):
        return ""
    finally:
        error.close()


class LocalVLMAnnotator:
    """A local transformers VLM answering with greedy decoding."""

    def __init__(self, name_or_path, max_new_tokens=400):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(name_or_path)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.max_new_tokens = max_new_tokens

    def __call__(self, image, text):
        import torch

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def build_annotator(cfg):
    if cfg.annotator == "openai":
        return OpenAIChatAnnotator(cfg.annotator_url, cfg.annotator_model)
    return LocalVLMAnnotator(cfg.annotator)


def _read_answers(out_path, fields):
    """(the file's text, its complete rows): JSON objects whose `fields` are strings; a line cut by a crash, or one
    edited into another shape, is left out (its image is asked again)."""
    text = out_path.read_text(encoding="utf-8", errors="replace") if out_path.exists() else ""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(isinstance(row.get(field), str) for field in fields):
            rows.append(row)
    return text, rows


def _append_answers(out_path, text, todo, ask, desc):
    """`ask(item) -> record` for every item of `todo`, each record appended to `out_path` as it comes."""
    with open(out_path, "a", encoding="utf-8") as handle:
        if todo and text and not text.endswith("\n"):
            handle.write("\n")  # a line cut by a crash stays on its own line, not glued to the next answer
        for item in tqdm(todo, desc=desc, unit="answer", disable=None):  # no bar without a terminal
            record = ask(item)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            yield item, record


def annotate_images(cfg, split, out_path, annotator=None):
    """`{id: response}` for every image of `split`: one request each (the official prompt), resumed from
    `out_path` (lines `{"id", "label", "response"}`). Split a response with `parse_annotation`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text, rows = _read_answers(out_path, ("id", "response"))
    done = {row["id"]: row["response"] for row in rows}
    ids, names = list(split["id"]), split.features["label"].names
    todo = [i for i in range(len(split)) if ids[i] not in done]
    annotator = annotator or build_annotator(cfg)
    logger.info("annotating %d images with %r (%d already done)", len(todo), annotator, len(done))

    def ask(index):
        row = split[index]
        label = names[row["label"]]
        return {"id": row["id"], "label": label,
                "response": annotator(prepare_image(row["image"]),
                                      annotation_prompt(label, names, cfg.annotator_prompt or "paper"))}

    for _, record in _append_answers(out_path, text, todo, ask, desc="annotate"):
        done[record["id"]] = record["response"]
    return {image_id: done[image_id] for image_id in ids if image_id in done}


def annotate_split(cfg, split, out_path, questions, annotator=None):
    """Rows {id, kind, question, answer} for every image and question (one request per pair, `questions[0]` the
    conversation question and `questions[1]` the reasoning one); resumes from `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text, rows = _read_answers(out_path, ("id", "kind", "question", "answer"))
    done = {(row["id"], row["question"]): row for row in rows}
    annotator = annotator or build_annotator(cfg)
    names = split.features["label"].names
    ids = list(split["id"])  # the column alone: `split[i]` would decode every image just to read its id
    todo = [(i, q) for i in range(len(split)) for q in questions if (ids[i], q) not in done]
    logger.info("annotating %d (image, question) pairs with %r (%d already done)", len(todo), annotator, len(done))

    def ask(item):
        index, question = item
        row = split[index]
        answer = annotator(prepare_image(row["image"]), annotation_request(question, names[row["label"]]))
        return {"id": row["id"], "kind": KINDS[questions.index(question)], "question": question, "answer": answer}

    for (index, question), record in _append_answers(out_path, text, todo, ask, desc="annotate"):
        done[(ids[index], question)] = record
    return [done[(ids[i], q)] for i in range(len(split)) for q in questions if (ids[i], q) in done]
