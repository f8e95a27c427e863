"""The Gradio demo (issue 15): served on 127.0.0.1 and driven in a real headless Chromium and through
`gradio_client`; what it shows is what `pipeline()` and `predict` give for the same file, a broken file gets a
readable message and the server keeps serving, the batch tab's CSV holds one row per file.

Browser tests need Debian's chromium and chromium-driver (`.ci/run` installs them); they skip without
/usr/bin/chromium, except in CI (CI=true), where they fail instead. A screenshot of the page lands in the test's
temporary folder (`python tests/demo_fixtures.py` writes the README's, docs/demo.png).
"""

import csv
import io
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import random_image
from demo_fixtures import (CHROMEDRIVER, CHROMIUM, by_css, chromium, classify_in_browser, external_requests,
                           open_page, serving, shown_confidences, shown_label, toasts, upload, wait_for)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TOLERANCE = 1e-5  # the demo and pipeline() run the same computation; the demo's scores are rounded to 6 decimals


@pytest.fixture(scope="module")
def demo_model(tiny_bundle_dir):
    from emovlm_kd.demo import load_model

    return load_model(tiny_bundle_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two readable images, a JPEG that is random bytes and a PNG with nothing in it."""
    folder = tmp_path_factory.mktemp("images")
    paths = {"a": folder / "a.png", "b": folder / "b.jpg", "broken": folder / "broken.jpg",
             "empty": folder / "empty.png"}
    random_image(60, 80, 1).save(paths["a"])
    random_image(96, 64, 2).save(paths["b"], quality=95)
    paths["broken"].write_bytes(bytes(range(256)) * 8)
    paths["empty"].write_bytes(b"")
    return paths


@pytest.fixture(scope="module")
def classify(tiny_bundle_dir, demo_model):
    """`pipeline()` as a user calls it: the bundle folder with its own code, on the demo model's device."""
    from transformers import pipeline

    model, _ = demo_model
    return pipeline(model=str(tiny_bundle_dir), trust_remote_code=True, device=model.device)


@pytest.fixture(scope="module")
def examples(demo_model, tmp_path_factory):
    from emovlm_kd.data.examples import example_files

    return example_files(demo_model[0], tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def server(demo_model, examples):
    from emovlm_kd.demo import build_demo

    model, processor = demo_model
    demo = build_demo(model, processor, examples=examples)
    with serving(demo) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must run the browser tests")
        pytest.skip(message)
    with chromium(tmp_path / "profile") as driver:
        yield driver
        assert external_requests(driver) == [], "the page may contact 127.0.0.1 only"


def shown_label_of(classify, path):
    return expected(classify, path)[1]


def expected(classify, path):
    """pipeline()'s {label: score} and top label for the image file at `path`."""
    predictions = classify(str(path))
    return {p["label"]: p["score"] for p in predictions}, predictions[0]["label"]


# ----------------------------------------------------------------------------------------------------------------
# In the browser
# ----------------------------------------------------------------------------------------------------------------


def test_the_page_shows_pipelines_top_label_and_scores(server, browser, classify, files, tmp_path):
    scores, top = expected(classify, files["a"])
    shown = classify_in_browser(browser, server, files["a"])
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert shown == top
    bars = shown_confidences(browser, "final-label")
    assert bars.keys() == scores.keys()  # every label has its bar
    assert all(abs(bars[label] - scores[label]) <= TOLERANCE for label in scores), (bars, scores)
    for branch in ("vlm-label", "head-label"):  # both branches' distributions, side by side
        assert len(shown_confidences(browser, branch)) == len(scores)
    verdict = by_css("#gate-verdict")(browser)[0].text
    assert top in verdict and "gate" in verdict
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_a_broken_upload_shows_a_message_and_the_next_upload_works(server, browser, classify, files):
    open_page(browser, server)
    upload(browser, "#image-input", files["broken"])
    message = wait_for(browser, lambda d: [t for t in toasts(d) if "not an image" in t], "error message")[0]
    assert "Traceback" not in message and "Traceback" not in browser.page_source
    assert shown_label(browser, "final-label") == ""  # nothing classified
    by_css("#image-input button[aria-label='Remove Image']")(browser)[0].click()
    upload(browser, "#image-input", files["b"])
    _, top = expected(classify, files["b"])
    assert wait_for(browser, lambda d: shown_label(d, "final-label"), "gate label after the error") == top


def test_picking_an_example_classifies_it(server, browser, classify, examples):
    open_page(browser, server)
    thumbnails = wait_for(browser, by_css(".gallery-item"), "example thumbnails")
    assert len(thumbnails) == len(examples)
    thumbnails[1].click()
    _, top = expected(classify, examples[1])
    assert wait_for(browser, lambda d: shown_label(d, "final-label"), "gate label of the example") == top


def test_the_batch_tab_gives_a_csv(server, browser, classify, files):
    open_page(browser, server)
    wait_for(browser, lambda d: [b for b in by_css("button[role=tab]")(d) if b.text == "Batch"], "Batch tab")[0].click()
    upload(browser, "#batch-files", files["a"], files["broken"])
    by_css("#batch-button")(browser)[0].click()
    link = wait_for(browser, by_css("#batch-csv a[href]"), "CSV download link")[0]
    href = link.get_attribute("href")
    assert href.startswith(server) and href.endswith(".csv")
    with urllib.request.urlopen(href, timeout=30) as response:  # what the download link gives
        rows = list(csv.DictReader(io.StringIO(response.read().decode("utf-8"))))
    assert [row["file"] for row in rows] == ["a.png", "broken.jpg"]
    assert rows[0]["label"] == shown_label_of(classify, files["a"]) and rows[0]["error"] == ""
    assert rows[1]["label"] == "" and "not an image" in rows[1]["error"]
    shown = wait_for(browser, lambda d: "broken.jpg" in by_css("#batch-table")(d)[0].text, "table rows")
    table = by_css("#batch-table")(browser)[0].text
    assert shown and table.index("a.png") < table.index("broken.jpg") and "not an image" in table


# ----------------------------------------------------------------------------------------------------------------
# Through gradio_client
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def test_the_classify_endpoint_gives_pipelines_label_and_scores(client, classify, files):
    from gradio_client import handle_file

    for name in ("a", "b"):
        scores, top = expected(classify, files[name])
        result = client.predict(handle_file(str(files[name])), api_name="/classify")
        assert result["label"] == top
        got = {c["label"]: c["confidence"] for c in result["confidences"]}
        assert got.keys() == scores.keys()
        assert all(abs(got[label] - scores[label]) <= TOLERANCE for label in scores), (got, scores)


def test_a_broken_file_is_a_readable_error_and_the_server_keeps_serving(client, classify, files):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    for name, why in (("broken", "not an image"), ("empty", "empty file")):
        with pytest.raises(AppError, match=why):
            client.predict(handle_file(str(files[name])), api_name="/classify")
    _, top = expected(classify, files["a"])
    assert client.predict(handle_file(str(files["a"])), api_name="/classify")["label"] == top


def test_the_batch_csv_has_a_row_per_file_with_predicts_values(client, demo_model, files):
    from gradio_client import handle_file

    from emovlm_kd.demo import DemoModel

    model, processor = demo_model
    names = ["a", "broken", "b"]
    table, csv_path = client.predict([handle_file(str(files[n])) for n in names], api_name="/batch")
    with open(csv_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    assert list(rows[0].keys()) == ["file", "label", "score", *labels, "error"]
    assert [row["file"] for row in rows] == [files[n].name for n in names]
    assert rows[1]["label"] == "" and "not an image" in rows[1]["error"]
    assert len(table["data"]) == 3
    single = DemoModel(model, processor)
    for row, name in ((rows[0], "a"), (rows[2], "b")):
        record = single.classify(files[name])  # a batch of one: what predict writes for this file alone
        assert row["label"] == record["label"] and row["error"] == ""
        assert all(abs(float(row[label]) - record["scores"][label]) <= TOLERANCE for label in labels)


def test_explain_streams_the_models_explanation(client, demo_model, files):
    from gradio_client import handle_file

    from emovlm_kd.demo import DemoModel

    model, processor = demo_model
    job = client.submit(handle_file(str(files["a"])), api_name="/explain")
    job.result(timeout=120)
    outputs = job.outputs()
    image = DemoModel(model, processor).load(files["a"])
    inputs = model.build_inputs(processor, [image])
    explanation = model.explain(**inputs, processor=processor).explanations[0]
    assert explanation and outputs[-1] == explanation
    assert len(outputs) > 1, "streamed: several partial explanations before the last"
    assert all(explanation.startswith(partial.rstrip()) for partial in outputs[:-1])


# ----------------------------------------------------------------------------------------------------------------
# Without a server
# ----------------------------------------------------------------------------------------------------------------


def record(final, vlm, head):
    return {"label": final, "vlm": {"label": vlm}, "distill": {"label": head}}


@pytest.mark.parametrize("final, vlm, head, expected_words", [
    ("awe", "awe", "awe", "Both branches said **awe** and the gate agreed"),
    ("awe", "awe", "fear", "followed the VLM (**awe**) over the distillation head (**fear**)"),
    ("fear", "awe", "fear", "followed the distillation head (**fear**): the VLM said **awe**"),
    ("fear", None, "fear", "followed the distillation head (**fear**): the VLM named no label"),
    ("anger", "awe", "awe", "Both branches said **awe**; the gate overrode both and chose **anger**"),
    ("anger", "awe", "fear", "overrode both and chose **anger**: the VLM said **awe**, the distillation head **fear**"),
])
def test_the_sentence_says_which_branch_the_gate_followed(final, vlm, head, expected_words):
    from emovlm_kd.demo import gate_verdict

    assert expected_words in gate_verdict(record(final, vlm, head))


def test_the_demo_command_refuses_a_missing_model_at_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "emovlm_kd.cli", "demo", "--model", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_an_image_payload_gives_its_file_or_its_data_url(demo_model, files):
    import base64

    import numpy as np

    from emovlm_kd.demo import DemoModel, payload_path
    from emovlm_kd.images import ImageLoadError

    assert payload_path(None) is None and payload_path({"path": None, "url": "http://127.0.0.1/x.png"}) is None
    assert payload_path({"path": "/tmp/a.png", "url": "http://127.0.0.1/a.png"}) == "/tmp/a.png"
    data_url = "data:image/png;base64," + base64.b64encode(files["a"].read_bytes()).decode()
    assert payload_path({"path": None, "url": data_url}) == data_url
    app = DemoModel(*demo_model)
    assert np.array_equal(np.asarray(app.load(data_url)), np.asarray(app.load(files["a"])))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        app.load("data:image/png;base64," + base64.b64encode(b"no image here").decode())
