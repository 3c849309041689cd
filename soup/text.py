"""Names from outside (folder and file names, checkpoint metadata) as soup prints them: each on the line it
was printed on, shown as written. A class folder named with a newline would otherwise split a table row,
a right-to-left override (U+202E) reorder what follows it, and `[red]` in a file name turn into colour.
And notices that something optional is off, said once per command however many runs of it ask."""

from __future__ import annotations

import contextlib
import contextvars
import unicodedata

from rich.markup import escape

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control, format (bidi controls, zero-width characters), surrogate (bytes os.fsdecode could not decode:
# a console cannot encode them) and line or paragraph separator characters.
_ESCAPED = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text) -> str:
    """`text` with every character that would break its line or reorder it written as an escape: `\\n`,
    `\\u202e`. Everything else, accents and scripts included, stays as it is."""
    return "".join(_escape(c) if unicodedata.category(c) in _ESCAPED else c for c in str(text))


def shown(text) -> str:
    """`printable(text)` for a rich console: markup in it is printed as written, not interpreted."""
    return escape(printable(text))


# The notices said so far in this command; None outside one (a library call): each call says its own.
_SAID: contextvars.ContextVar[set | None] = contextvars.ContextVar("soup_notices_said", default=None)


@contextlib.contextmanager
def one_notice_each():
    """Within it (a whole command, the demo), `first_time` is true once per notice: a demo that trains
    three recipes, or a sweep of eight, says once that TensorBoard is off, not once per run. Nested, the
    outer scope's notices count."""
    token = _SAID.set(set() if _SAID.get() is None else _SAID.get())
    try:
        yield
    finally:
        _SAID.reset(token)


def first_time(notice: str) -> bool:
    """Whether the notice named `notice` is still to be said (and from now on, within the scope, said)."""
    said = _SAID.get()
    if said is None:
        return True
    if notice in said:
        return False
    said.add(notice)
    return True
