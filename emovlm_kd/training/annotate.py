"""Conversation and reasoning answers written by an annotator model (stage 0), resumable.

`--annotator openai --annotator-url URL --annotator-model NAME`: any OpenAI-compatible chat endpoint; the key comes
only from the environment (`EMOVLM_KD_API_KEY`, else `OPENAI_API_KEY`) and is never logged or written.
`--annotator PATH_OR_ID`: a local transformers VLM (`AutoModelForImageTextToText`).
Answers are appended to `annotations.jsonl` as they come; a rerun skips the (image, question) pairs already done.
"""

import base64
import io
import json
import logging
import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from emovlm_kd.images import prepare_image

logger = logging.getLogger(__name__)

API_KEY_VARIABLES = ("EMOVLM_KD_API_KEY", "OPENAI_API_KEY")
KINDS = {0: "conversation", 1: "reasoning"}


def annotation_request(question, label):
    """The instruction given to the annotator: the paper's question, with the label as a hint (as EmoVIT)."""
    return (
        f"{question} The image is annotated with the emotion '{label}'. Write two to four sentences that ground "
        "the answer in visible elements of the image."
    )


def api_key():
    for name in API_KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    raise ValueError(f"--annotator openai needs an API key in the environment ({' or '.join(API_KEY_VARIABLES)})")


class OpenAIChatAnnotator:
    """Calls `{url}/chat/completions` with the image as a data URL."""

    def __init__(self, url, model, timeout=120):
        if not url or not model:
            raise ValueError("--annotator openai needs --annotator-url and --annotator-model")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self._key = model, timeout, api_key()

    def __repr__(self):  # never show the key
        return f"OpenAIChatAnnotator(url={self.url!r}, model={self.model!r})"

    def __call__(self, image, text):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": text}]}],
            "temperature": 0.2,
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["message"]["content"].strip()


class LocalVLMAnnotator:
    """A local transformers VLM answering with greedy decoding."""

    def __init__(self, name_or_path, max_new_tokens=160):
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


def annotate_split(cfg, split, out_path, questions, annotator=None):
    """Rows {id, kind, question, answer} for every image and question; resumes from `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    text = out_path.read_text(encoding="utf-8") if out_path.exists() else ""
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: redo that pair
            continue
        done[(row["id"], row["question"])] = row
    annotator = annotator or build_annotator(cfg)
    names = split.features["label"].names
    ids = list(split["id"])  # the column alone: `split[i]` would decode every image just to read its id
    todo = [(i, q) for i in range(len(split)) for q in questions if (ids[i], q) not in done]
    logger.info("annotating %d (image, question) pairs with %r (%d already done)", len(todo), annotator, len(done))
    with open(out_path, "a", encoding="utf-8") as handle:
        if todo and text and not text.endswith("\n"):
            handle.write("\n")  # a line cut by a crash stays on its own line, not glued to the next answer
        for index, question in tqdm(todo, desc="annotate", unit="answer"):
            row = split[index]
            answer = annotator(prepare_image(row["image"]), annotation_request(question, names[row["label"]]))
            record = {"id": row["id"], "kind": KINDS[questions.index(question)], "question": question,
                      "answer": answer}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            done[(row["id"], question)] = record
    return [done[(ids[i], q)] for i in range(len(split)) for q in questions if (ids[i], q) in done]
