"""Reading, checking and writing the JSON files behind the typed records (manifest, perf map):
one place for the file handling, so every record fails the same way, naming the file and field."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import PrismError

NUMBER = (int, float)
# a manifest or map nests a handful of levels; Python's parser recurses once per level and raises
# RecursionError near 1000, so deeper files are refused before parsing
MAX_JSON_DEPTH = 64
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as stream:
        json.dump(data, stream, indent=2, sort_keys=False)
        stream.write("\n")
        temporary = Path(stream.name)
    os.replace(temporary, path)


def read_json_object(path: Path, error: type[PrismError], missing_hint: str) -> dict:
    """The JSON object in ``path``; ``error`` naming the file when it is missing, not text, not
    JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing; {missing_hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8); {missing_hint}") from None
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        raise error(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels of brackets, which no file written by "
                    f"prism-trt is; {missing_hint}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{path}: not valid JSON ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` opens more than ``limit`` arrays or objects inside each other
    (brackets within strings do not count), found without recursing."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif bracket in ("]", "}"):
            depth -= 1
    return False


class Fields:
    """Typed access to one JSON object's fields, raising ``error`` with the field's full path."""

    def __init__(self, data: Any, where: str, error: type[PrismError]):
        if not isinstance(data, dict):
            raise error(f"{where}: expected a JSON object, found {type(data).__name__}")
        self.data, self.where, self.error = data, where, error

    def fail(self, key: str, problem: str) -> PrismError:
        return self.error(f"{self.where}.{key}: {problem}")

    def get(self, key: str, kinds: type | tuple[type, ...] | None = None, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.error(f"{self.where}: required field {key!r} is missing")
        value = self.data[key]
        if value is None and optional:
            return None
        if kinds is not None and (not isinstance(value, kinds)
                                  or isinstance(value, bool) and bool not in _tuple(kinds)):
            names = "/".join(k.__name__ for k in _tuple(kinds))
            raise self.fail(key, f"expected {names}, found {type(value).__name__} {_short(value)}")
        return value

    def number(self, key: str, optional: bool = False, minimum: float | None = None, positive: bool = False
               ) -> float | None:
        """A finite number (JSON has no NaN, but Python's json reads ``NaN`` and ``Infinity``)."""
        value = self.get(key, NUMBER, optional)
        if value is None:
            return None
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond float's range
            finite = False
        if not finite:
            raise self.fail(key, f"must be a finite number, found {_short(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, found {value}")
        if positive and value <= 0:
            raise self.fail(key, f"must be > 0, found {value}")
        return float(value)

    def integer(self, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
        value = self.get(key, int, optional)
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, found {value}")
        return value

    def integers(self, key: str, minimum: int = 0, length: int | None = None) -> tuple[int, ...]:
        """A list of integers (not booleans) >= ``minimum``, of ``length`` entries when given."""
        values = self.get(key, list)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
            raise self.fail(key, f"expected integers >= {minimum}, found {_short(values)}")
        if length is not None and len(values) != length:
            raise self.fail(key, f"expected {length} entries, found {len(values)}")
        return tuple(values)

    def nested(self, key: str, optional: bool = False) -> Fields | None:
        value = self.get(key, dict, optional)
        return None if value is None else Fields(value, f"{self.where}.{key}", self.error)

    def items(self, key: str) -> list[Fields]:
        """The objects of a list field, each with its index in the path."""
        return [Fields(item, f"{self.where}.{key}[{index}]", self.error)
                for index, item in enumerate(self.get(key, list))]


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
