"""Config files for the stoppers: one table of settings read from YAML or TOML, strictly.

A duplicate key, a file that is not UTF-8, a table that is not a table: each a ValueError that
names the file and what is wrong, before training.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from green_callbacks.units import brief

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FORMATS = (".toml", ".yaml", ".yml")
SECTIONS = ("budget", "efficiency")  # the tables a green-callbacks table holds (the stoppers' ``section``)


def _yaml_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, tuple[int, int]] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be given again here
                    continue
                key = self.construct_object(key_node, deep=True)
                at = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)  # (one line: `{energy: 1 kWh,
                try:  # energy: 500 kWh}`, as a flow mapping writes it)
                    first = seen.setdefault(key, at)
                except TypeError:  # an unhashable key: PyYAML's own error says so below
                    continue
                if first != at:
                    where = (f"line {first[0]} and line {at[0]}" if first[0] != at[0] else
                             f"line {at[0]}, columns {first[1]} and {at[1]}")
                    raise ValueError(f"duplicate key {brief(key)} ({where}); give each key once")
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node: Any) -> int:
            return _plain_number(node, super().construct_yaml_int(node))

        def construct_yaml_float(self, node: Any) -> float:
            return _plain_number(node, super().construct_yaml_float(node))

    StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
    StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)
    return StrictLoader


def _plain_number(node: Any, value: Any) -> Any:
    """YAML 1.1 (PyYAML's) reads ``1:30`` as 90 (base 60) and ``010`` as 8 (octal), where YAML 1.2 and a person
    read a time and ten: refused, with what it would have been, rather than a budget or a cadence silently other
    than the one written."""
    text = str(node.value).replace("_", "").lstrip("+-")
    sexagesimal = ":" in text
    octal = len(text) > 1 and text[0] == "0" and text[1].isdigit() and "." not in text and "e" not in text.lower()
    if sexagesimal or octal:
        sign = "-" if str(node.value).lstrip().startswith("-") else ""
        fix = ("write the number you mean, or quote it if it is text" if sexagesimal else
               f"write {sign}{text.lstrip('0') or '0'} for the decimal number, or quote it if it is text")
        raise ValueError(f"{brief(node.value)} (line {node.start_mark.line + 1}) reads as {value!r} in YAML 1.1, "
                         f"{'a number in base 60' if sexagesimal else 'an octal number'}; {fix}")
    return value


def _table(path: Path, data: dict[str, Any], *keys: str) -> dict[str, Any] | None:
    """``data[keys[0]][keys[1]]...``; None where a level is missing, an error where one is not a table."""
    for n, key in enumerate(keys, start=1):
        if key not in data:
            return None
        data = data[key]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: '{'.'.join(keys[:n])}' must be a table of settings, not "
                             f"{type(data).__name__} {brief(data, 60)}")
    return data


def read_section(path: str | Path, section: str, valid: Collection[str]) -> dict[str, Any]:
    """The ``green-callbacks.<section>`` table of a YAML or TOML file (``pyproject.toml`` included).

    TOML: ``[tool.green-callbacks.<section>]`` or ``[green-callbacks.<section>]`` or ``[<section>]``;
    YAML: a ``green-callbacks:`` mapping, or ``<section>:`` at the top level. Keys outside ``valid``
    are errors.
    """
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise ValueError(f"path={brief(path)} must be the path of a .yaml, .yml or .toml file")
    if "\x00" in str(path):  # open() would say only "embedded null byte"
        raise ValueError(f"path={brief(str(path))} holds a NUL character ('\\x00'), which no file path can hold; "
                         "give the path of a .yaml, .yml or .toml file")
    path = Path(path)
    suffix = path.suffix.lower()  # (green.YAML, as some systems and editors write it)
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown config format {brief(path.suffix)}; use .yaml, .yml or .toml")
    kind = suffix[1:].upper()
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                         f"save it as UTF-8 {kind}") from exc
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file (from {Path.cwd()})") from None
    except OSError as exc:  # a folder, no permission
        raise ValueError(f"{path}: the config file cannot be read ({exc.strerror or exc})") from None
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader that refuses duplicate keys
    except Exception as exc:  # the parsers' own errors and a duplicate key, named with the file
        raise ValueError(f"{path}: not valid {kind}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the file must hold a table of settings, not {type(data).__name__} {brief(data, 60)}")
    tables = [(keys, found) for keys in (("tool", "green-callbacks"), ("green-callbacks",))
              if (found := _table(path, data, *keys)) is not None]
    if len(tables) > 1:  # one would be read and the other ignored without a word
        raise ValueError(f"{path}: both [tool.green-callbacks] and [green-callbacks] are there; keep one")
    if tables:
        (keys, table), = tables
        # YAML's two places for one table, both filled: one would be ignored unsaid
        if section in data and section in table and keys == ("green-callbacks",):
            raise ValueError(f"{path}: both 'green-callbacks.{section}' and a top-level '{section}' are there; keep "
                             "one")
        data, where = table, ".".join(keys)
        strays = sorted(map(str, set(data) - set(SECTIONS)))  # (a top level is anyone's: a Hydra config's own keys)
        if strays:  # a `monitor:` table beside the budget was read by nothing, without a word
            raise ValueError(f"{path}: unknown table(s) {strays} under {where}; it holds {list(SECTIONS)} (read by "
                             "EnergyBudget.from_file and EfficiencyEarlyStopping.from_file); the monitor's settings "
                             "are its arguments")
    else:
        where = "the top level"
    if section not in data:
        raise ValueError(f"{path}: no '{section}' table under {where}; found {sorted(map(str, data))}")
    table = data[section]
    if not isinstance(table, dict | None):
        raise ValueError(f"{path}: '{section}' must be a table of settings, not {brief(table, 60)}")
    table = dict(table or {})
    unknown = sorted(map(str, set(table) - set(valid)))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in '{section}'; valid keys are {list(valid)}")
    return table
