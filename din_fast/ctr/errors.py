"""Errors a user of the din-fast command can cause with a file or an option.

The command reports each as one line, ``din-fast: error: <message>``, with exit
status 2. Messages name the file (and line, where there is one) and what was
expected there; they quote at most a short, escaped snippet of what was found.
"""

SNIPPET_CHARS = 40


class InputError(ValueError):
    """A file or an option that cannot be used as given."""


class DataFormatError(InputError):
    """A data file without the expected layout or content."""


class CheckpointError(InputError):
    """A checkpoint that is not one din-fast wrote, or whose contents do not fit together."""


class OutputError(InputError):
    """An output path the command cannot write, or one that would overwrite an input."""


def snippet(text: str) -> str:
    """A short, escaped quote of ``text`` for an error message."""
    quoted = repr(text)
    return quoted if len(quoted) <= SNIPPET_CHARS else quoted[:SNIPPET_CHARS - 4] + "...'"
