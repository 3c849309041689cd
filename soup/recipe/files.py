"""Recipe files as YAML: read safely, before any value is trusted.

Only YAML's safe subset is read (no tags that build objects: a recipe never chooses code to run), a key
written twice in one mapping is refused (YAML would keep the last silently), alias bombs and deep
nesting are capped before anything expands them, and a file that is not UTF-8 names its line. `--set`
overrides are read as YAML too and set by dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from soup.errors import SoupError

MAX_VALUES = 100_000  # values in a recipe with every YAML alias expanded; a real recipe has under 100
MAX_DEPTH = 50  # nesting levels of a recipe


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe subset, refusing a key written twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: overriding merged keys is the point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise SoupError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}; write each key once")
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                pass
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def check_size(value: Any, memo: dict, active: set, depth: int = 0) -> int:
    """How many values `value` holds with every YAML alias expanded (each shared node is counted once per
    use, in time linear in the distinct nodes): an alias bomb is refused before anything expands it."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in active:
        raise SoupError("a YAML alias refers to a value that contains it; write the value out")
    if depth > MAX_DEPTH:
        raise SoupError(f"values nested more than {MAX_DEPTH} levels deep; a recipe needs a few")
    if id(value) not in memo:
        active.add(id(value))
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(check_size(child, memo, active, depth + 1) for child in children)
        active.discard(id(value))
        if memo[id(value)] > MAX_VALUES:
            raise SoupError(f"more than {MAX_VALUES:,} values once YAML aliases are expanded (the cap of a "
                            "recipe); write the values out or use fewer aliases")
    return memo[id(value)]


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SoupError(f"cannot set '{dotted}': '{'.'.join(keys[:depth + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 1e-3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SoupError(f"--set {text!r}: write key.path=value, e.g. --set train.epochs=2")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except SoupError as err:
        raise SoupError(f"--set {text!r}: {err}") from None
    return key.strip(), value


def read_recipe_file(path: Path) -> Any:
    """The YAML tree of the recipe file at `path` (None for an empty file); every reading error is one line
    naming the file and, where known, the line."""
    if not path.is_file():
        raise SoupError(f"recipe {path}: no such file; recipes/ holds the shipped ones")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SoupError(f"recipe {path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                        "UTF-8") from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SoupError(f"recipe {path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except SoupError as err:
        raise SoupError(f"recipe {path} {err}") from None
    except RecursionError:
        raise SoupError(f"recipe {path}: values nested too deeply to read; a recipe needs a few levels") from None
