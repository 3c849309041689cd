"""Names from outside (folder and file names, checkpoint metadata) as soup prints them: each on the line it
was printed on, shown as written. A class folder named with a newline would otherwise split a table row,
a right-to-left override (U+202E) reorder what follows it, and `[red]` in a file name turn into colour.
Long ingredient names (`recipe/NN-<settings>`) as tables and pictures show them: by their sweep index,
with the settings in a legend. Notices that something optional is off, said once per command however many
runs of it ask. And the transient progress bar every loop shows on a terminal (nothing elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import unicodedata

from rich.columns import Columns
from rich.console import Console
from rich.errors import LiveError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


# An ingredient's name: its recipe's name, then its sweep id (soup.recipe.spec.ingredient_id: `NN-<settings>`).
_INGREDIENT = re.compile(r"^(?P<recipe>.+)/(?P<index>\d{2,})-(?P<settings>.+)$", re.DOTALL)


def short_names(names) -> dict[str, str]:
    """Each name -> the label a table or picture shows: a sweep's `recipe/NN-<settings>` as `NN` when all
    such names come from one recipe (else `recipe/NN`); other names as they are. Where two labels would be
    alike, every name stays whole."""
    names = list(dict.fromkeys(names))
    parsed = {name: _INGREDIENT.match(name) for name in names}
    recipes = {m["recipe"] for m in parsed.values() if m}
    labels = {name: (m["index"] if len(recipes) == 1 else f"{m['recipe']}/{m['index']}") if m else name
              for name, m in parsed.items()}
    return labels if len(set(labels.values())) == len(labels) else {name: name for name in names}


def legend(names) -> tuple[str, dict[str, str]]:
    """What the short ids of `names` stand for: a heading, and each shortened name -> its entry (its id,
    which starts with its short id: `00-lr0.001-seed1`; with several recipes, the whole name)."""
    long = sorted(name for name, label in short_names(names).items() if label != name)
    recipes = {_INGREDIENT.match(name)["recipe"] for name in long}
    if len(recipes) != 1:
        return "ingredient ids: <recipe>/<index>-<settings>", {name: name for name in long}
    [recipe] = recipes
    return f"ingredient ids: {printable(recipe)}/<index>-<settings>", {name: name[len(recipe) + 1:] for name in long}


def print_legend(names, console: Console) -> None:
    """The names `short_names` shortens, each once per command (see one_notice_each): which settings each
    short id stands for. Laid out in columns, so that 16 ingredients take a few lines."""
    if console.quiet:  # said to no one: still to be said where someone reads
        return
    heading, entries = legend(names)
    unsaid = [entry for name, entry in entries.items() if first_time(f"legend {name}")]
    if unsaid:
        console.print(escape(heading))
        console.print(Columns([f"  {shown(entry)}" for entry in unsaid], padding=(0, 2)))


@contextlib.contextmanager
def progress_bar(console: Console, description: str, total: int):
    """A transient bar for a loop of `total` steps; yields the function that advances it one step. On a
    terminal it is redrawn in place and gone when the loop ends; elsewhere (a log file, a test's runner)
    nothing is printed, not even a blank line. Inside another live display (a bar already shown) it stays
    silent."""
    bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(description, total=total)
    try:
        bar.start()
    except LiveError:
        yield lambda: None
        return
    try:
        yield lambda: bar.advance(task)
    finally:
        bar.stop()
