"""The error type for user mistakes (bad data, bad config): command-line tools print it without a traceback."""
import errno

__all__ = ["VQAError", "unreadable", "unreachable", "preview"]

# What the system says of a path it will not look at: a folder on it the user may not enter, a name too long.
_UNREACHABLE = (errno.EACCES, errno.EPERM, errno.ENAMETOOLONG)


class VQAError(ValueError):
    """A problem with the user's input, stated as what, where and how to fix it."""

    def __init__(self, *args) -> None:
        # torch re-raises a DataLoader worker's error in the loop as this type, built from one text: "Caught
        # VQAError in DataLoader worker process 0.", the worker's traceback, then "vqa.errors.VQAError: <message>".
        # The message alone is what the user is told, as where the error is raised without workers.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught VQAError in DataLoader worker"):
            _, found, message = args[0].rpartition(f"\n{VQAError.__module__}.VQAError: ")
            if found:
                args = (message.rstrip("\n"),)
        super().__init__(*args)


def unreadable(kind: str, path, error: OSError, advice: str = "check its permissions") -> VQAError:
    """The error for a file of ``kind`` the OS would not let us read (permissions, a name too long, ...)."""
    return VQAError(f"cannot read {kind} '{path}' ({error.strerror or error}); {advice}")


def unreachable(error: OSError) -> str | None:
    """The message for an ``error`` that a path cannot be looked at or opened, as Python's ``Path.exists()`` and
    ``is_file()`` raise it (on Python 3.11) for a path inside a folder the user may not enter or a name too long;
    None for another error."""
    if not error.filename or error.errno not in _UNREACHABLE:
        return None
    return (f"cannot get at '{error.filename}' ({error.strerror or error}); check the path, and the permissions of "
            f"the file and of the folders on it")


def preview(items, limit: int = 3) -> str:
    """The first ``limit`` of ``items`` for a message, as reprs, with ", ..." where there are more."""
    items = list(items)
    return ", ".join(repr(i) for i in items[:limit]) + (", ..." if len(items) > limit else "")
