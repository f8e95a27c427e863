"""One module per `emovlm-kd` subcommand, each with `add_arguments(parser)` and `run(args) -> int`."""
