"""`emovlm-kd predict --model DIR INPUT...`: one JSON line per input image.

Exit status: 0 when every input was predicted, 1 when some were skipped (each gets a line with `error`),
2 for usage errors.
"""

import json
import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="bundle folder or Hub id")
    parser.add_argument("--output", help="write JSON lines here instead of stdout")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vlm-mode", choices=["score", "generate"], default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)


def run(args):
    import torch
    from tqdm.auto import tqdm

    from emovlm_kd.errors import UsageError
    from emovlm_kd.hub import load_bundle
    from emovlm_kd.images import ImageLoadError, iter_image_files, load_image_file
    from emovlm_kd.inference import PromptPrefixCache, describe, run_batch

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = list(iter_image_files(args.inputs))
    if not paths:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, processor = load_bundle(args.model, dtype=dtype, device=device)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model: cannot load {args.model!r}: {error}")
    id2label = model.config.id2label
    prompt_cache = PromptPrefixCache()  # the model stays frozen for the whole run: its prompt prefix is encoded once

    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as error:
        raise UsageError(f"--output: cannot write {args.output!r}: {error}")
    predicted = skipped = 0
    try:
        with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, disable=None) as bar:
            for start in range(0, len(paths), args.batch_size):
                chunk = paths[start : start + args.batch_size]
                records, images, slots = [], [], []
                for path in chunk:
                    try:
                        images.append(load_image_file(path, max_side=model.config.max_image_side))
                        slots.append(len(records))
                        records.append({"path": str(path)})
                    except ImageLoadError as error:
                        logger.warning("skipping %s: %s", path, error)
                        records.append({"path": str(path), "error": str(error)})
                if images:
                    output = run_batch(model, processor, images, vlm_mode=args.vlm_mode, prompt_cache=prompt_cache)
                    for i, slot in enumerate(slots):
                        records[slot].update(describe(output, i, id2label))
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                predicted += len(images)
                skipped += len(chunk) - len(images)
                bar.update(len(chunk))
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"predicted {predicted}, skipped {skipped}", file=sys.stderr)
    return 1 if skipped else 0
