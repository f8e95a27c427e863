"""Every command's `--help`: flags shown with dashes, each with its description and its default.

- `HelpFormatter`: the formatter of every `emovlm-kd` parser (and of `train`'s TrlParser): a flag's dashed spelling
  only (`--val-fraction`; HfArgumentParser also accepts `--val_fraction`, not shown), each option's default after
  its text where the text does not state it, and flags in a text never broken at their dashes.
- `parsers_of(parser)`: a parser and every subcommand's parser below it.
"""

import argparse
import copy
import textwrap


class HelpFormatter(argparse.HelpFormatter):
    """Every command's help: flags with dashes (`--val-fraction`; `train`'s HfArgumentParser also accepts its twin
    `--val_fraction`, which the help does not show), and each option's default after its text where the text does not
    state it (`(default: 8)`; not for switches, or options whose default is None)."""

    def add_usage(self, usage, actions, groups, prefix=None):
        for action in actions:  # the usage line shows an option's first spelling: the dashed one
            action.option_strings.sort(key=lambda option: "_" in option)  # (stable; parsing looks spellings up by name)
        return super().add_usage(usage, actions, groups, prefix)

    def _format_action_invocation(self, action):
        shown = dashed_spellings(action.option_strings)
        if shown != action.option_strings:
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)

    def _split_lines(self, text, width):  # a flag in the text is not broken at its dashes (`--gate-` / `samples`)
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action(self, action):
        if action.help is None and shows_default(action):  # an option without text still shows its default
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def dashed_spellings(option_strings):
    """`["--val_fraction", "--val-fraction"]` -> `["--val-fraction"]`: a spelling with underscores is left out where
    its dashed twin exists."""
    return [option for option in option_strings if "_" not in option or option.replace("_", "-") not in option_strings]


def shows_default(action):
    """Whether an option's help states its default: a value that does something (not None, an empty list or a
    switch's False)."""
    switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                                 argparse._VersionAction, argparse._SubParsersAction))
    empty = action.default is None or action.default is argparse.SUPPRESS or action.default == []
    return bool(action.option_strings) and not switch and not empty


def parsers_of(parser):
    """`parser` and every subcommand's parser below it (`ablate`'s own subcommands included)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_parser in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from parsers_of(sub_parser)
