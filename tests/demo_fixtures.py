"""The demo served and driven in headless Chromium: what `tests/test_demo.py` uses, and the script that writes the
README's screenshot:

    python tests/demo_fixtures.py --model runs/demo/model --output docs/demo.png

Chromium is Debian's (`/usr/bin/chromium` + `/usr/bin/chromedriver`, driven by Selenium through that driver: no
driver or browser download), run with the flags a closed network needs (no background, component-update or sync
requests). The page may contact 127.0.0.1 only: `external_requests` lists whatever else it asked for.
"""

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000"]
WAIT_S = 60.0  # the longest wait for one thing to appear in the page (2 busy CPU cores)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(demo):
    """`demo` served on 127.0.0.1 on a free port while the block runs: yields its URL."""
    from emovlm_kd.demo import launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@contextlib.contextmanager
def chromium(profile_dir):
    """A headless Chromium (Selenium, Debian's chromedriver) with a fresh profile in `profile_dir` and its network
    requests logged (`external_requests`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, find, what, timeout=WAIT_S):
    """`find(driver)` once it returns something truthy; `TimeoutError` naming `what` otherwise."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = find(driver)
        except WebDriverException:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in the page after {timeout:.0f} s")
        time.sleep(0.2)


def by_css(selector):
    from selenium.webdriver.common.by import By

    return lambda driver: driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url):
    driver.get(url)
    wait_for(driver, by_css("#image-input input[type=file]"), "image upload field")


def upload(driver, selector, *paths):
    """Give the file input under `selector` the files at `paths` (what choosing them in the file dialog does)."""
    field = wait_for(driver, by_css(f"{selector} input[type=file]"), f"file input under {selector}")[0]
    field.send_keys("\n".join(str(Path(path).resolve()) for path in paths))


def shown_label(driver, elem_id):
    """The top label a `gr.Label` (by `elem_id`) shows, or '' while it shows none."""
    found = by_css(f"#{elem_id} [data-testid=label-output-value]")(driver)
    return found[0].text.strip() if found else ""


def shown_confidences(driver, elem_id):
    """{label: confidence} of the bars a `gr.Label` shows (each bar's `<meter value>`)."""
    meters = by_css(f"#{elem_id} meter")(driver)
    return {meter.get_attribute("aria-label"): float(meter.get_attribute("value")) for meter in meters}


def toasts(driver):
    """The texts of the notifications (gr.Error / gr.Warning) the page shows now."""
    return [toast.text for toast in by_css("[data-testid=toast-body]")(driver) if toast.text.strip()]


def external_requests(driver):
    """The http(s)/ws(s) URLs the page requested from a host other than 127.0.0.1 (from Chromium's network log)."""
    external = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") not in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            continue
        url = message["params"].get("request", {}).get("url") or message["params"].get("url", "")
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname != "127.0.0.1":
            external.append(url)
    return external


def classify_in_browser(driver, url, image_path):
    """Open the page, upload `image_path` and wait for its result: the top label shown for the gate."""
    open_page(driver, url)
    upload(driver, "#image-input", image_path)
    return wait_for(driver, lambda d: shown_label(d, "final-label") and by_css("#gate-verdict p")(d)
                    and shown_label(d, "final-label"), "gate label")


def explanation_done(driver):
    """The explanation the page shows once it has stopped streaming (no progress shown on its box), else ''."""
    box = by_css("#explanation textarea")(driver)
    busy = by_css("#explanation .eta-bar, #explanation .progress-text, #explanation .generating")(driver)
    return box[0].get_attribute("value").strip() if box and not busy else ""


def screenshot(model_id, output, image=None, explain=True):
    """The demo page for `model_id` with `image` (default: the page's first example image) classified and, with
    `explain`, explained, saved as a PNG at `output` (palette-quantised to stay small)."""
    from PIL import Image

    from emovlm_kd.data.examples import example_files
    from emovlm_kd.demo import build_demo, load_model

    model, processor = load_model(model_id, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        examples = example_files(model, tmp)
        demo = build_demo(model, processor, examples=examples)
        with serving(demo) as url, chromium(Path(tmp) / "profile") as driver:
            driver.set_window_size(1280, 1400)
            classify_in_browser(driver, url, image or examples[0])
            if explain:
                by_css("#explain-button")(driver)[0].click()
                wait_for(driver, lambda d: explanation_done(d), "explanation", timeout=300)
            time.sleep(1.0)  # the bars' width transition
            raw = Path(tmp) / "page.png"
            driver.save_screenshot(str(raw))
        Image.open(raw).convert("RGB").quantize(colors=64).save(output, optimize=True)
    return Path(output)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="a screenshot of the demo page (headless Chromium)")
    parser.add_argument("--model", default="runs/demo/model", help="bundle folder or Hub id")
    parser.add_argument("--output", default="docs/demo.png")
    parser.add_argument("--image", default=None, help="the image to classify (default: the first example)")
    parser.add_argument("--no-explain", action="store_true", help="do not press Explain before the screenshot")
    args = parser.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    path = screenshot(args.model, args.output, args.image, explain=not args.no_explain)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
