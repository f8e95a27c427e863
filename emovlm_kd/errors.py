"""Errors the command line turns into exit codes (`emovlm_kd.cli`): a `UsageError` (or `InputError`) exits with
status 2 and its message, a `ModelCheckError` with status 3 and its one line (an OS error is one line too; any
other error keeps its traceback)."""


def few(items, count=5):
    """The first `count` of `items` for a message: "a, b, c and 4 more"."""
    items = [str(item) for item in items]
    return ", ".join(items[:count]) + (f" and {len(items) - count} more" if len(items) > count else "")


def first_line(error):
    """The first line of an exception's message for a one-line message (its type's name when it says nothing)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class UsageError(Exception):
    """A bad flag or value: the command exits with status 2 and this message."""


class InputError(UsageError, ValueError):
    """A user's input found wrong once a run has started (a dataset or split file that does not read, a teacher whose
    labels are not the dataset's, an instruction mix without answers): exits with status 2 and this message like a
    `UsageError`, and is a `ValueError` for code that calls the library directly. Any other `ValueError` is a bug
    and keeps its traceback."""


class ModelCheckError(Exception):
    """A model folder that exists but cannot be used as it is (unreadable or incomplete weights, labels that are not
    0..N-1 or do not fit the weights, answer tokens outside the vocabulary or not the labels', a processor that does
    not load). `file` is the file at fault (or the folder), `problem` says what is wrong; `str()` is one line."""

    def __init__(self, file, problem):
        self.file, self.problem = str(file), str(problem)
        super().__init__(f"{self.file}: {self.problem}")
