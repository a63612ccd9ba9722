"""The data pipeline's user-facing error (kept dependency-free so ``data.demo`` imports fast)."""


class DataError(ValueError):
    """A dataset problem the user can fix; the message is one line naming the problem and the fix."""
