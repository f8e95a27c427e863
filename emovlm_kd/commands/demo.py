"""`emovlm-kd demo --model DIR_OR_REPO`: the Gradio demo in the browser (needs the `demo` extra: gradio).

    emovlm-kd demo --model runs/demo/model                       # http://127.0.0.1:7860
    emovlm-kd demo --model runs/demo/model --port 7861
    emovlm-kd demo --model you/emovlm-kd-fi --host 0.0.0.0       # reachable from other machines
    emovlm-kd demo --model runs/demo/model --share               # a temporary public link through gradio.live

The page: upload, paste or pick an example image; the final label distribution, the VLM branch's and the
distillation head's side by side, which branch the gate followed; Explain streams the model's reasoning; the Batch
tab turns several files into a CSV. The same model loading and checks as `predict` (exit status 3 for a model that
cannot be loaded); the server runs until interrupted (Ctrl-C). `app.py` at the repository root runs the same app
as a Hugging Face Space does.
"""

import logging
import os
from dataclasses import dataclass
from functools import partial

from emovlm_kd.errors import UsageError
from emovlm_kd.settings import REQUIRED, DeviceArguments, help_field

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DemoArguments(DeviceArguments):
    model: str = help_field("bundle folder or Hub id", REQUIRED)
    host: str = help_field("address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
                           "127.0.0.1")
    port: int = help_field("port to listen on (default 7860)", 7860)
    share: bool = help_field("also open a temporary public link through gradio's share servers (needs the internet)",
                             False)

    def _checks(self):
        yield 0 < self.port < 65536, "port", "must be between 1 and 65535"


ARGUMENTS = DemoArguments


def run(args: DemoArguments) -> int:
    from emovlm_kd.modelcheck import local_model_folder

    try:
        local_model_folder(args.model)
    except OSError as error:
        raise UsageError(f"--model: {error}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio (gradio/analytics.py); before import
    from emovlm_kd.demo import build_demo, launch, load_model, require_gradio

    try:
        require_gradio()
    except ImportError as error:
        raise UsageError(str(error))
    from emovlm_kd.runtime import resolve_dtype

    try:
        model, processor = load_model(args.model, device=args.device, dtype=resolve_dtype(args.dtype))
    except (OSError, ValueError) as error:  # ModelCheckError propagates: exit status 3, one line
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")
    from emovlm_kd.data.examples import example_files

    demo = build_demo(model, processor, examples=partial(example_files, model))  # its own, else synthetic ones
    logger.info("serving %s on http://%s:%d (Ctrl-C to stop)", args.model, args.host, args.port)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share,
               share_hint="* To create a public link, add --share.")
    except OSError as error:  # gradio: "Cannot find empty port in range: ..." (gradio/http_server.py)
        raise UsageError(f"cannot serve on {args.host}:{args.port}: {error}")
    return 0
