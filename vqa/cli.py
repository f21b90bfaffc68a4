"""What the command-line tools share: their entry point, and paths that may start at a home folder."""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

__all__ = ["run_tool", "expand_home", "user_path"]


def run_tool(main: Callable[[], int]) -> NoReturn:
    """Runs a command-line tool's ``main`` and exits with the status it returns. A character the console's
    encoding lacks (a path or question in another script on an ASCII console) prints as an escape, as it
    does on stderr, instead of ending the tool in a UnicodeEncodeError after its work."""
    if hasattr(sys.stdout, "reconfigure"):  # a TextIOWrapper; not None (no console) or a replaced stream
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.exit(main())


def expand_home(path: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded as a shell expands it, which no shell does inside a
    YAML file or after ``--flag=``. A ``~`` that names no home folder is a ValueError: left as it is, it
    would be a folder named ``~`` in the working folder."""
    try:
        expanded = os.path.expanduser(path)
    except ValueError as e:  # a NUL or a lone surrogate where the user's name would be
        raise ValueError(f"'{path}' starts with '~' and no user's name ({e})") from None
    if expanded.startswith("~"):
        user = path[1:].replace(os.sep, "/").split("/")[0]
        whose = f"there is no user '{user}'" if user else "there is no home folder (HOME is not set)"
        raise ValueError(f"'{path}' starts with '~{user}', but {whose}; write the path in full (./{path} for a "
                         f"folder named so)")
    return expanded


def user_path(text: str) -> Path:
    """An argparse ``type`` for a path argument: ``expand_home``, its error as argparse's own."""
    try:
        return Path(expand_home(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
