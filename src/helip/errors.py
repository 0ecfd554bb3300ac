"""Errors a user can cause. The CLI prints their one-line message and exits 2.

Every message says what is wrong *and* how to fix it, because the person
reading it is usually several hours into a pipeline and wants the next command,
not a traceback.
"""


class HelipError(Exception):
    """Base class of user-facing errors (bad input, bad flag, stale files)."""


class InputError(HelipError):
    """An input file or directory is missing, malformed or inconsistent."""


class StaleError(HelipError):
    """A derived file (embeddings, hard pairs) belongs to another dataset."""


class ConfigError(HelipError):
    """An option value is out of range or options contradict each other."""


def exit_status(prog: str, command, *args) -> int:
    """Run ``command(*args)`` for a command line: 0, or a ``HelipError`` as one line on stderr and 2.

    Both entry points (``helip`` and ``python -m helip.open_clip_train``) end this way, so every
    user mistake reads the same: ``PROG: error: what is wrong and what to do``.
    """
    import sys

    try:
        command(*args)
    except HelipError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
