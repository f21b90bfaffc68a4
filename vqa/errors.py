"""The error type for user mistakes (bad data, bad config): command-line tools print it without a traceback."""

__all__ = ["VQAError"]


class VQAError(ValueError):
    """A problem with the user's input, stated as what, where and how to fix it."""
