"""The demo as a Hugging Face Space runs it (`python app.py`): the model named by $EMOVLM_KD_MODEL (a bundle
folder or Hub id; default runs/demo/model, what `emovlm-kd train` writes), served by `emovlm_kd.demo`.

    EMOVLM_KD_MODEL=you/emovlm-kd-fi python app.py

A Space sets $GRADIO_SERVER_NAME and $GRADIO_SERVER_PORT, which gradio reads; elsewhere it listens on
127.0.0.1:7860 (or the next free port). `emovlm-kd demo --model ...` is the same app from the command line.
Importing this file does nothing: everything happens under `if __name__ == "__main__"`.
"""

import os
import sys

MODEL_VARIABLE = "EMOVLM_KD_MODEL"
DEFAULT_MODEL = "runs/demo/model"


def main():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio (gradio/analytics.py)
    from functools import partial

    from emovlm_kd.data.examples import example_files
    from emovlm_kd.demo import build_demo, launch, load_model
    from emovlm_kd.logs import setup_logging

    setup_logging(os.environ.get("EMOVLM_KD_LOG_LEVEL", "INFO"))
    model, processor = load_model(os.environ.get(MODEL_VARIABLE) or DEFAULT_MODEL)
    launch(build_demo(model, processor, examples=partial(example_files, model)))  # its own, else synthetic ones
    return 0


if __name__ == "__main__":
    sys.exit(main())
