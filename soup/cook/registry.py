"""The soup methods' one registry, and the options each method declares (as mergekit's
`MergeMethod.parameters()`): name, type, default and help. `soup cook` builds a flag per method and per
option from it, `--best` takes its candidates from it and the demo cooks them, so a method registered
anywhere (soup.cook.methods, a plugin, a test) needs no other code to be used.

A method is `@soup_method(name, options=[Option(...)])` on a function (ingredients, selector, console,
kitchen) -> Soup; its options reach it checked and with their defaults filled in, as `kitchen.options`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from soup.errors import SoupError

# What an option may be: a flag (off by default), a whole number, a number or text.
KINDS = {bool: "on or off (a flag)", int: "a whole number", float: "a number", str: "text"}


@dataclass(frozen=True)
class Option:
    """One option of a soup method: `soup cook --NAME` (underscores as dashes), `kitchen.options[NAME]`.
    `check` replaces the type and bounds check with the method's own (it raises SoupError); `cli=False`
    keeps a fitting knob off the command line (the Python API and tests still set it)."""

    name: str
    type: type
    default: object
    help: str
    metavar: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[object], object] | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How an error names it: the flag, or, off the command line, the option's own name."""
        return self.flag if self.cli else f"option {self.name}"

    def expected(self) -> str:
        kind = KINDS[self.type] if self.type is not float or self.minimum is not None or self.maximum is not None \
            else "a finite number"
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} from {self.minimum:g} to {self.maximum:g}"
        if self.minimum is not None:
            return f"{kind}, at least {self.minimum:g}"
        return f"{kind}, at most {self.maximum:g}" if self.maximum is not None else kind

    def value(self, value):
        """`value` checked (None stands for a default of None); a bad one is one line naming the option."""
        if self.check is not None:
            self.check(value)
            return value
        if value is None and self.default is None:
            return None
        number = self.type in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = (isinstance(value, bool) if self.type is bool else isinstance(value, str) if self.type is str
                else number and (self.type is float or isinstance(value, int)) and math.isfinite(value)
                and (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum))
        if not fits:
            shown = value if number else repr(value)
            raise SoupError(f"{self.label} {shown}: expected {self.expected()}")
        return float(value) if self.type is float else value

    def from_text(self, text):
        """A command-line value: read as the option's type, then checked."""
        if not isinstance(text, str) or self.type in (bool, str):
            return self.value(text)
        try:
            read = self.type(text)
        except ValueError:
            raise SoupError(f"{self.label} {text}: expected {self.expected()}") from None
        return self.value(read)


@dataclass
class SoupMethod:
    name: str
    fn: Callable
    needs_selection: bool
    takes_soups: bool = False  # may mix finished soups too (interpolate), not only ingredients
    options: dict[str, Option] = field(default_factory=dict)
    # Starts from the best ingredient on the selection set (its first member): on holdout, cooking then
    # measures the soup against that ingredient on val.
    starts_from_best: bool = False

    @property
    def summary(self) -> str:
        """The first paragraph of the method's docstring, on one line: its --help text."""
        return " ".join((self.fn.__doc__ or "").split("\n\n")[0].split())


METHODS: dict[str, SoupMethod] = {}


def _declared(name: str, options: list[Option]) -> dict[str, Option]:
    """The options by name, each a valid declaration: a mistake here is the method author's, said at import."""
    declared = {}
    for option in options:
        if not option.name.isidentifier() or option.name in declared:
            raise ValueError(f"soup method {name}: option {option.name!r} is not a new identifier")
        if option.type not in KINDS or not option.help.strip():
            raise ValueError(f"soup method {name}: option {option.name} needs a type (bool, int, float or str) "
                             "and a help text")
        if option.type is bool and option.default is not False:
            raise ValueError(f"soup method {name}: flag {option.name} must default to False (the flag turns it on)")
        option.value(option.default)  # a default that its own check refuses is a bug, not a user mistake
        declared[option.name] = option
    return declared


def soup_method(name: str, needs_selection: bool = False, takes_soups: bool = False,
                options: list[Option] | None = None, starts_from_best: bool = False):
    """Register the decorated function as the soup method `name` (`soup cook --NAME`) with its options."""
    if not name.isidentifier():
        raise ValueError(f"soup method {name!r}: a method's name is its flag, an identifier")

    def register(fn):
        METHODS[name] = SoupMethod(name, fn, needs_selection, takes_soups, _declared(name, options or []),
                                   starts_from_best)
        return fn
    return register


def settle_options(method: str, given: dict) -> dict:
    """The options `method` runs with: those given, checked, the others at their defaults. An option of
    another method, or of none, is one line naming the methods it goes with."""
    spec = METHODS[method]
    for name in given:
        if name not in spec.options:
            owners = [f"--{m}" for m, s in METHODS.items() if name in s.options]
            flag = "--" + name.replace("_", "-")
            raise SoupError(f"{flag} is not an option of the {method} soup" +
                            (f"; it goes with {' or '.join(owners)}" if owners else ""))
    return {name: option.value(given.get(name, option.default)) for name, option in spec.options.items()}
