"""The error type for user mistakes (bad data, bad config): command-line tools print it without a traceback."""

__all__ = ["VQAError", "unreadable"]


class VQAError(ValueError):
    """A problem with the user's input, stated as what, where and how to fix it."""


def unreadable(kind: str, path, error: OSError, advice: str = "check its permissions") -> VQAError:
    """The error for a file of ``kind`` the OS would not let us read (permissions, a name too long, ...)."""
    return VQAError(f"cannot read {kind} '{path}' ({error.strerror or error}); {advice}")
