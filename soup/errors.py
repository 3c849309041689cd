"""One exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""

import re


class SoupError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it, in one line."""

    exit_code = 2


class Interrupted(SoupError):
    """Ctrl-C or SIGTERM: the run stopped cleanly, its saved state intact."""

    exit_code = 130


def one_line(err: BaseException) -> str:
    """The user's line of an error, also when a DataLoader worker wrapped it with its traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    match = re.match(r"soup\.errors\.\w+: (.*)", lines[-1])
    return match.group(1) if match else lines[-1]
