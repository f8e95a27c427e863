"""The Gradio demo: try a model on your own pictures and ask it why.

    emovlm-kd demo --model runs/demo/model                  # http://127.0.0.1:7860
    EMOVLM_KD_MODEL=you/emovlm-kd-fi python app.py          # the same app, as a Hub Space runs it

`build_demo(model, processor)` returns a `gr.Blocks`:

- Image tab: upload, paste or pick an example image; the final (gate) label distribution as bars, the VLM branch's
  and the distillation head's distributions side by side, a sentence saying which branch the gate followed, and an
  Explain button that streams the model's answer to the paper's reasoning instruction (`model.explain`).
- Batch tab: several files in, a table and a CSV to download (one row per file: file, label, score, each label's
  score; a file that is not a readable image gets a row with its error).

Every number shown is what `emovlm-kd predict` writes for the same file (`inference.run_batch` + `describe`, the
file read by `images.load_image_file`). A file that is not a readable image gets a message in the page
(`gr.Error`), never a stack trace, and the server keeps serving. The named endpoint `/classify` returns the final
label distribution, so `gradio_client.Client(url).predict(handle_file(path), api_name="/classify")` gives the same
top label and scores as `pipeline()`.

Nothing here reaches the internet unless `share=True`: analytics are off (`Blocks(analytics_enabled=False)`: gradio's
`Blocks.__init__` starts its PyPI version check only when analytics are enabled, and `launch` sends its telemetry
only then; gradio/blocks.py, 6.31), the theme's fonts are gradio's bundled `LocalFont`s (gradio/themes/default.py)
and server-side rendering (a Node server) is off. gradio is the `demo` extra: `pip install "emovlm-kd[demo]"`.
"""

import csv
import logging
import sys
import tempfile
import threading
from pathlib import Path

from emovlm_kd.folders import bundle_examples

logger = logging.getLogger(__name__)

CSV_NAME = "emovlm_kd_predictions.csv"
MODEL_QUEUE = "model"  # every event that runs the model shares one queue of concurrency 1 (gradio's concurrency_id)


def require_gradio():
    """The `gradio` module, or an `ImportError` saying how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError('the demo needs gradio: pip install "emovlm-kd[demo]" (or pip install gradio)') from error
    return gradio


def load_model(model_id, device=None, dtype=None):
    """(model, processor) of a bundle folder or Hub id, checked (`hub.load_model`), on `device` (default: CUDA when
    there is one), in eval mode."""
    from emovlm_kd import hub
    from emovlm_kd.runtime import resolve_device

    model, processor, _ = hub.load_model(model_id, device=resolve_device(device), dtype=dtype)
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# What the page shows, as plain functions (tested without a server)
# ----------------------------------------------------------------------------------------------------------------


def gate_verdict(record):
    """A sentence saying which branch the gate followed for one `describe` record: the VLM, the distillation head,
    both (they agreed), or neither (it overrode both)."""
    final, vlm, head = record["label"], record["vlm"]["label"], record["distill"]["label"]
    said = f"the VLM said **{vlm}**" if vlm is not None else "the VLM named no label"
    if vlm == head == final:
        return f"Both branches said **{final}** and the gate agreed."
    if vlm == head:
        return f"Both branches said **{vlm}**; the gate overrode both and chose **{final}**."
    if final == vlm:
        return f"The gate followed the VLM (**{vlm}**) over the distillation head (**{head}**)."
    if final == head:
        return f"The gate followed the distillation head (**{head}**): {said}."
    return f"The gate overrode both and chose **{final}**: {said}, the distillation head **{head}**."


def csv_rows(records, labels):
    """The batch tab's table: a header, then one row per record (file, label, score, each label's score, error)."""
    rows = [["file", "label", "score", *labels, "error"]]
    for record in records:
        if "error" in record:
            rows.append([record["file"], "", "", *([""] * len(labels)), record["error"]])
        else:
            rows.append([record["file"], record["label"], record["score"],
                         *(record["scores"][label] for label in labels), ""])
    return rows


def write_csv(rows, folder):
    """`rows` written as `folder/CSV_NAME` (UTF-8, RFC 4180 quoting); its path."""
    path = Path(folder) / CSV_NAME
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


class DemoModel:
    """The model behind the page: one image file -> one `describe` record, a batch of files, and the streamed
    explanation. Errors a user causes (a file that is not an image) raise `ImageLoadError` with a readable message."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.labels = model.config.labels

    def load(self, path):
        """The prepared image of a file (or a `data:` URL): `ImageLoadError` saying what is wrong otherwise."""
        from emovlm_kd.images import ImageLoadError, load_image_file, prepare_image

        if not path:
            raise ImageLoadError("no image given")
        if str(path).startswith("data:"):
            try:
                return prepare_image(str(path), max_side=self.model.config.max_image_side)
            except Exception as error:  # Pillow's and base64's many errors, as load_image_file reports them
                raise ImageLoadError(f"not a readable image: {type(error).__name__}: {error}") from None
        return load_image_file(path, max_side=self.model.config.max_image_side)

    def classify(self, path):
        """`describe`'s record for the image file at `path` (what `emovlm-kd predict` writes for it)."""
        from emovlm_kd.inference import describe, run_batch

        output = run_batch(self.model, self.processor, [self.load(path)])
        return describe(output, 0, self.model.config.id2label)

    def classify_files(self, paths):
        """One record per path, in order, with `file` (its name): the prediction, or `error`."""
        from emovlm_kd.inference import PromptPrefixCache, predict_files

        found = predict_files(self.model, self.processor, paths, self.load, prompt_cache=PromptPrefixCache())
        return [{"file": Path(path).name, **record} for path, record in zip(paths, found)]

    def explain_stream(self, path, generation_kwargs=None):
        """Yield the explanation of the image at `path` as it grows (`model.explain` in a thread, its tokens through a
        `TextIteratorStreamer`, the usual transformers streaming pattern); the last value is the finished
        explanation, stripped as `explain` returns it."""
        from transformers import TextIteratorStreamer

        from emovlm_kd.inference import model_inputs

        image = self.load(path)
        inputs = model_inputs(self.model, self.processor, [image])  # as `run_batch` prepares them
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def work():
            try:
                result["output"] = self.model.explain(**inputs, processor=self.processor,
                                                      generation_kwargs=generation_kwargs, streamer=streamer)
            except BaseException as error:  # handed to the caller below; the streamer is ended so it stops waiting
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, name="emovlm-kd-explain", daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            if text.strip():
                yield text.strip()
        thread.join()
        if "error" in result:
            raise result["error"]
        yield result["output"].explanations[0]


# ----------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------


def payload_path(payload):
    """The uploaded file's path in an image component's raw payload (the events that read images run with
    `preprocess=False`: gr.Image's own preprocess opens the file with PIL first, so a broken file would fail inside
    gradio with a message that is not ours; here `load_image_file` reads it and says what is wrong). The payload was
    already checked to be a file gradio received (`Blocks.preprocess_data` moves and checks inputs before the
    `preprocess` flag is read; gradio/blocks.py, 6.31). None for no image; a `data:` URL when that is all there is."""
    if not payload:
        return None
    if isinstance(payload, str):
        return payload
    url = payload.get("url") or ""
    return payload.get("path") or (url if url.startswith("data:") else None)


def build_demo(model, processor, examples=None, title="EmoVLM-KD"):
    """The demo page for `model` and `processor` (see the module docstring); `examples`: image files to offer, or a
    function writing them into a given folder (`partial(emovlm_kd.data.examples.example_files, model)`: the
    bundle's own, else synthetic ones, as `emovlm-kd demo` and app.py pass), called with a folder inside the demo's
    temporary one; default: the bundle's own examples (`folders.bundle_examples`). Generated examples and the batch
    tab's CSV files live in one temporary folder, removed with the returned `Blocks` (or at exit)."""
    gr = require_gradio()
    app = DemoModel(model, processor)
    labels = app.labels
    scratch = tempfile.TemporaryDirectory(prefix="emovlm_kd_demo_")  # under the system temp dir: gradio serves it
    if examples is None:
        examples = bundle_examples(model.name_or_path)
    elif callable(examples):
        examples = examples(Path(scratch.name) / "examples")
    examples = [str(path) for path in examples]

    def readable(error):
        logger.warning("%s", error)
        return gr.Error(str(error), title="Not an image", print_exception=False)

    def classify(payload):
        from emovlm_kd.images import ImageLoadError

        path = payload_path(payload)
        if not path:
            return {}, None
        try:
            record = app.classify(path)
        except ImageLoadError as error:
            raise readable(error) from None
        return record["scores"], record

    def branches(record):
        if not record:
            return {}, {}, ""
        return record["vlm"]["scores"], record["distill"]["scores"], gate_verdict(record)

    def explain(payload):
        from emovlm_kd.images import ImageLoadError

        path = payload_path(payload)
        if not path:
            raise gr.Error("Upload, paste or pick an image first.", title="No image")
        try:
            yield from app.explain_stream(path)
        except ImageLoadError as error:
            raise readable(error) from None

    def batch(paths):
        if not paths:
            raise gr.Error("Choose one or more image files first.", title="No files")
        records = app.classify_files(paths)
        rows = csv_rows(records, labels)
        bad = [record for record in records if "error" in record]
        if bad:
            gr.Warning(f"{len(bad)} of {len(records)} file(s) are not readable images: " +
                       "; ".join(f"{r['file']}: {r['error']}" for r in bad[:3]))
        path = write_csv(rows, tempfile.mkdtemp(prefix="batch_", dir=scratch.name))  # a folder per call
        return rows[1:], str(path)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nWhich emotion does an image evoke? Labels: {', '.join(labels)}.")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                     elem_id="image-input")
                    with gr.Row():
                        classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                        explain_button = gr.Button("Explain", elem_id="explain-button")
                    if examples:
                        gr.Examples(examples=examples, inputs=image, label="Examples")
                with gr.Column():
                    final = gr.Label(num_top_classes=len(labels), label="EmoVLM-KD (gate)", elem_id="final-label")
                    verdict = gr.Markdown(elem_id="gate-verdict")
                    with gr.Row():
                        vlm = gr.Label(num_top_classes=len(labels), label="VLM branch", elem_id="vlm-label")
                        head = gr.Label(num_top_classes=len(labels), label="Distillation head", elem_id="head-label")
                    explanation = gr.Textbox(label="Why? (the model's reasoning)", lines=4, interactive=False,
                                             elem_id="explanation")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", type="filepath", label="Images", elem_id="batch-files")
            batch_button = gr.Button("Classify all", variant="primary", elem_id="batch-button")
            table = gr.Dataframe(headers=["file", "label", "score", *labels, "error"], label="Predictions",
                                 interactive=False, elem_id="batch-table")
            download = gr.File(label="CSV", elem_id="batch-csv")
        record = gr.State()

        gr.on([image.change, classify_button.click], classify, inputs=image, outputs=[final, record],
              api_name="classify", concurrency_id=MODEL_QUEUE, concurrency_limit=1, preprocess=False,
              ).then(branches, inputs=record, outputs=[vlm, head, verdict], api_visibility="private")
        image.change(lambda: "", outputs=explanation, api_visibility="private", queue=False)
        explain_button.click(explain, inputs=image, outputs=explanation, api_name="explain",
                             concurrency_id=MODEL_QUEUE, concurrency_limit=1, preprocess=False)
        batch_button.click(batch, inputs=files, outputs=[table, download], api_name="batch",
                           concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    demo.emovlm_kd_scratch = scratch  # kept as long as the page is
    return demo


def launch(demo, host=None, port=None, share=False, prevent_thread_lock=False, share_hint=None, quiet=False,
           **kwargs):
    """`demo.launch` with the project's settings: no server-side rendering (no Node server) and a share link only
    when asked. `host` / `port` None: gradio's own defaults ($GRADIO_SERVER_NAME or 127.0.0.1, $GRADIO_SERVER_PORT
    or the first free port from 7860; a Space sets both). Returns what `launch` returns: (app, local URL, share URL).

    Gradio's own lines are replaced by ours: the local URL, and `share_hint` (the CLI's: "add --share") where
    gradio would tell a user of the CLI to "set `share=True` in `launch()`"; `quiet` prints neither."""
    result = demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, quiet=True,
                         prevent_thread_lock=True, **kwargs)
    if not quiet:
        _, local_url, share_url = result
        print(f"* Running on local URL:  {local_url}", flush=True)
        if share_hint and not share_url:
            print(share_hint, flush=True)
    if not prevent_thread_lock and not getattr(sys, "ps1", sys.flags.interactive):
        demo.block_thread()  # what gradio's launch does in a script (not in a Python shell): serve until Ctrl-C
    return result
