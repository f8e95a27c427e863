"""The benchmarks' command lines: a settings dataclass read by transformers' `HfArgumentParser`."""


def parse_settings(kind, argv, prog, description):
    """A `kind` (a settings dataclass) from the words `argv` (None: the command line); a value its `__post_init__`
    refuses (`ValueError`) exits with status 2 and says which flag, as argparse does for a malformed one."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(kind, prog=prog, description=description)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2
    return args
