"""One exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""

import contextlib
import re
import signal

from soup.text import printable


class SoupError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it, in one line."""

    exit_code = 2


class Interrupted(SoupError):
    """Ctrl-C or SIGTERM: the run stopped cleanly, its saved state intact."""

    exit_code = 130


def one_line(err: BaseException) -> str:
    """The user's line of an error, also when a DataLoader worker wrapped it with its traceback. A name in
    it with a newline or a bidi control (a class folder's) is written as an escape (soup.text), so that
    the line stays one and whole."""
    text = str(err).strip()
    if "Traceback (most recent call last)" not in text:
        return printable(text) or type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    match = re.match(r"soup\.errors\.\w+: (.*)", lines[-1])
    return printable(match.group(1) if match else lines[-1])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_on_signals():
    """Ctrl-C and SIGTERM (a preempted job) raise KeyboardInterrupt, so that a run stops cleanly with one
    line wherever it is; a signal that the parent process ignores (`cmd &` in a script) stays ignored."""
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupt}
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()
                    if signal.getsignal(sig) is not signal.SIG_IGN}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
