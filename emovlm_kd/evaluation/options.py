"""The command-line flags every evaluation command shares (`emovlm-kd evaluate`, `emovlm-kd table1`) and their
checks. Imports nothing heavy: the commands add these flags before `--help` is printed."""

from emovlm_kd.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")


def add_common_arguments(parser):
    """--split, --vlm-mode, --batch-size, --device, --dtype, --limit, --output-dir."""
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--vlm-mode", choices=["score", "generate"], default=None,
                        help="how the VLM branch answers (default: the model's config; the paper generates)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: as saved)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--output-dir", required=True, help="folder for the report files")


def check_common_arguments(args):
    """`UsageError` for a batch size or limit below 1."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
