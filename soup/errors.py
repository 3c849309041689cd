"""One exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""


class SoupError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it, in one line."""

    exit_code = 2


class Interrupted(SoupError):
    """Ctrl-C or SIGTERM: the run stopped cleanly, its saved state intact."""

    exit_code = 130
