"""Random search: draw each ingredient's hyperparameters, as the model-soups paper drew its ingredients.

A recipe's `search:` section (validated, with every drawn value, when the recipe is read):

    search:
      trials: 16                 # draws; with a sweep, every grid combination gets every trial
      seed: 0                    # the same (recipe, seed) always draws the same trials
      space:                     # dotted recipe key -> one distribution
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        train.label_smoothing: {uniform: [0.0, 0.2]}
        data.augment: {choice: [none, randaugment]}
        train.seed: {randint: [0, 999]}          # both ends included

Interface (soup.recipe.spec calls it; this module knows nothing of the recipe schema):
- `check(space, trials, seed, grid, validate)` raises one-line SoupErrors for every mistake. `validate`
  is the recipe's own validation of {dotted key: value}; it sees the ends of each range, every choice,
  and every drawn trial, so a bad value is refused before any data is read.
- `draw_trials(space, trials, seed)` -> one {key: value} per trial, keys sorted.

Reproducible by construction: each key draws from its own `random.Random(f"{seed}/{key}")`, never the
global RNG, so the order of keys in the file does not matter, adding a key leaves the others' draws alone,
and raising `trials` keeps the earlier trials. Only `Random.random()` is used: its sequence is the one
Python promises across versions (`randint`/`choice` algorithms may change). Drawn floats are rounded to
3 significant digits, so an ingredient's id, its settings and its recipe hold the same short number.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from soup.errors import SoupError
from soup.recipe.checks import close_match

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
SECTIONS = ("sweep", "search")  # recipe sections that no sweep or search may set
MAX_INGREDIENTS = 1000  # grid combinations x trials, per recipe
DIGITS = 3
EXAMPLE = "e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}"


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple  # (low, high), or the choices

    def sample(self, u: float) -> Any:
        """The value at quantile `u` in [0, 1)."""
        if self.kind == "choice":
            return self.args[min(int(u * len(self.args)), len(self.args) - 1)]
        low, high = self.args
        if self.kind == "randint":
            return low + min(int(u * (high - low + 1)), high - low)
        if self.kind == "uniform":
            value = low + u * (high - low)
        else:
            value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return min(max(float(f"{value:.{DIGITS}g}"), low), high)

    def extremes(self) -> list[tuple[str, Any]]:
        """(label, value) of everything a draw can reach the edge of: both ends, or every choice."""
        if self.kind == "choice":
            return [("choice", c) for c in self.args]
        return [("low", self.args[0]), ("high", self.args[1])]


def _number(value: Any, integer: bool) -> float | int | None:
    if isinstance(value, bool):
        return None
    if integer:
        return value if isinstance(value, int) else None
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) else None


def parse(key: str, spec: Any) -> Distribution:
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SoupError(f"{where}: expected one distribution ({', '.join(DISTRIBUTIONS)}), {EXAMPLE}; "
                        f"got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        hint = close_match(str(kind), DISTRIBUTIONS)
        raise SoupError(f"{where}: unknown distribution {kind!r}{hint}; use one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SoupError(f"{where}: choice needs a non-empty list of values, got {args!r}")
        return Distribution(kind, tuple(args))
    bounds = [_number(a, kind == "randint") for a in args] if isinstance(args, list) else []
    if len(bounds) != 2 or None in bounds:
        what = "integers" if kind == "randint" else "numbers"
        raise SoupError(f"{where}: {kind} needs [low, high] ({what}), got {args!r}")
    low, high = bounds
    if low > high:
        raise SoupError(f"{where}: {kind} low {low} is above high {high}")
    if kind == "loguniform" and low <= 0:
        raise SoupError(f"{where}: loguniform needs 0 < low, got {low}; use uniform to include 0")
    return Distribution(kind, (low, high))


def parse_space(space: Any, grid: dict) -> dict[str, Distribution]:
    if not isinstance(space, dict) or not space:
        raise SoupError(f"search.space: expected a mapping of dotted recipe keys to distributions, {EXAMPLE}")
    parsed = {}
    for key in sorted(space, key=str):
        if not isinstance(key, str) or not key:
            raise SoupError(f"search.space: {key!r} is not a dotted recipe key, {EXAMPLE}")
        if key.split(".")[0] in SECTIONS:
            raise SoupError(f"search.space.{key}: a search cannot set the sweep or the search itself")
        if key in grid:
            raise SoupError(f"search.space.{key}: also in sweep:; search a key or put it on the grid, not both")
        for section, others in (("sweep", grid), ("search.space", space)):
            other = nested_key(key, others)
            if other is not None:
                raise nesting_error(f"search.space.{key}", f"{section}.{other}")
        parsed[key] = parse(key, space[key])
    return parsed


def nested_key(key: str, others) -> str | None:
    """The first of `others` that is `key`'s parent or lies inside it (model.kwargs and
    model.kwargs.drop_path_rate): whichever is set later would overwrite what the other set."""
    return next((o for o in others if isinstance(o, str) and (o.startswith(f"{key}.") or key.startswith(f"{o}."))),
                None)


def nesting_error(where: str, other: str) -> SoupError:
    """`where` and `other` (as the recipe spells them: sweep.X, search.space.Y) nest: one line naming both."""
    return SoupError(f"{where} and {other}: one key lies inside the other, so the values of one would overwrite "
                     "the other's and the ingredients would train alike while their ids name different values; "
                     "set each value through one key only")


def _draw(space: dict[str, Distribution], trials: int, seed: int) -> list[dict]:
    columns = {}
    for key, dist in space.items():
        rng = random.Random(f"{seed}/{key}")
        columns[key] = [dist.sample(rng.random()) for _ in range(trials)]
    return [{key: columns[key][i] for key in sorted(space)} for i in range(trials)]


def draw_trials(space: dict, trials: int, seed: int) -> list[dict]:
    """The trials' values, {dotted key: value} with keys sorted; the same for the same arguments."""
    return _draw(parse_space(space, {}), trials, seed)


def describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def check(space: Any, trials: int, seed: int, grid: dict, validate: Callable[[dict], None],
          key: str = "search.trials") -> None:
    """Refuse, in one line, anything wrong with a search section (see the module comment). `key`: the
    key that sets how many `trials` are drawn (search.max_trials, when a pruned search has it)."""
    if trials < 1:
        raise SoupError(f"{key} must be at least 1")
    combinations = math.prod(len(values) for values in grid.values())
    if trials * combinations > MAX_INGREDIENTS:
        raise SoupError(f"{key}: {trials} trials x {combinations} sweep combinations = "
                        f"{trials * combinations} ingredients; at most {MAX_INGREDIENTS} per recipe")
    parsed = parse_space(space, grid)
    for key, dist in parsed.items():
        for label, value in dist.extremes():
            try:
                validate({key: value})
            except SoupError as err:
                raise SoupError(f"search.space.{key}: {label} {value!r}: {err}") from None
    for index, drawn in enumerate(_draw(parsed, trials, seed)):
        try:
            validate(drawn)
        except SoupError as err:  # each value was fine alone; together they are not
            raise SoupError(f"search trial {index} ({describe(drawn)}): {err}") from None
