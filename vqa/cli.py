"""What the command-line tools share: their entry point, and their path and count arguments."""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from lora import atomic_write

from .config import expand_home
from .errors import VQAError, unreachable

__all__ = ["run_tool", "user_path", "at_least", "check_new_out", "first_line", "write_out"]


def run_tool(main: Callable[[], int]) -> NoReturn:
    """Runs a command-line tool's ``main`` and exits with the status it returns. A character the console's
    encoding lacks (a path or question in another script on an ASCII console) prints as an escape, as it
    does on stderr, instead of ending the tool in a UnicodeEncodeError after its work."""
    if hasattr(sys.stdout, "reconfigure"):  # a TextIOWrapper; not None (no console) or a replaced stream
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = main()
    except OSError as e:  # the checks on a path met one the system would not look at
        if (message := unreachable(e)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        code = 2
    sys.exit(code)


def user_path(text: str) -> Path:
    """An argparse ``type`` for a path argument: ``expand_home``, its error as argparse's own."""
    if not text:  # Path("") is the working folder ('.'), which the user did not name
        raise argparse.ArgumentTypeError("the path is empty; give a file or folder")
    try:
        return Path(expand_home(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, or argparse's usage error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def check_new_out(out: Path, overwrite: bool, inputs: dict[str, Path | None], example: str,
                  earlier: Callable[[Path], bool], what: str) -> None:
    """Refuses a tool's ``--out`` that is a folder (``example``: a file name to suggest in it), one of its ``inputs``
    (by option), a file that exists without ``overwrite``, and with it any file but an ``earlier`` output of the tool
    (``what``: such a file, in words): before any work, so a mistake costs no time."""
    if out.is_dir():
        raise VQAError(f"--out '{out}' is a folder; give the file to write, e.g. {out / example}")
    for option, path in inputs.items():
        if path is not None and out.exists() and path.exists() and os.path.samefile(out, path):
            raise VQAError(f"--out '{out}' is the {option} file; give another path")
    if out.exists() and (not out.is_file() or not earlier(out)):
        raise VQAError(f"--out '{out}' exists and is not {what}, so it is not written over, even with --overwrite; "
                       f"give another path")
    if out.exists() and not overwrite:
        raise VQAError(f"--out '{out}' exists; add --overwrite to replace it, or give another path")


def first_line(path: Path) -> str | None:
    """The first line of a text file (a byte order mark and the line end left out), or None if it is unreadable."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return f.readline(1000).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None


def write_out(path: Path, text: str, option: str) -> None:
    """Writes a tool's output ``text`` to ``path`` atomically (a crash leaves the old file or none); an error of the
    file system as the tools' error naming ``option``."""
    try:
        with atomic_write(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise VQAError(f"cannot write {option} '{path}' ({e.strerror or e}); check that its folder exists and is "
                       f"writable") from None
