"""The error type for user mistakes (bad data, bad config): command-line tools print it without a traceback."""
import sys
from typing import Callable, NoReturn

__all__ = ["VQAError", "unreadable", "run_tool"]


class VQAError(ValueError):
    """A problem with the user's input, stated as what, where and how to fix it."""


def unreadable(kind: str, path, error: OSError, advice: str = "check its permissions") -> VQAError:
    """The error for a file of ``kind`` the OS would not let us read (permissions, a name too long, ...)."""
    return VQAError(f"cannot read {kind} '{path}' ({error.strerror or error}); {advice}")


def run_tool(main: Callable[[], int]) -> NoReturn:
    """Runs a command-line tool's ``main`` and exits with the status it returns. A character the console's
    encoding lacks (a path or question in another script on an ASCII console) prints as an escape, as it
    does on stderr, instead of ending the tool in a UnicodeEncodeError after its work."""
    if hasattr(sys.stdout, "reconfigure"):  # a TextIOWrapper; not None (no console) or a replaced stream
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.exit(main())
