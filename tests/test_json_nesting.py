"""Manifests and performance maps nested deeper than any real one are refused with the record's
own error before Python's JSON parser can recurse past its limit, by the readers and by the
commands that read them (no RecursionError traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prism_trt.engines import Manifest, ManifestError
from prism_trt.engines.json_record import MAX_JSON_DEPTH, read_json_object
from prism_trt.engines.perfmap import PerfMap, PerfMapError

DEEP = [
    ("1500_arrays", "[" * 1500 + "]" * 1500),
    ("100000_open_brackets", "[" * 100_000),
    ("map_inside_an_object", '{"points": ' + "[" * 1500 + "]" * 1500 + "}"),
    ("1500_objects", '{"a": ' * 1500 + "1" + "}" * 1500),
]


@pytest.mark.parametrize("text", [text for _, text in DEEP], ids=[name for name, _ in DEEP])
def test_deep_nesting_is_the_records_error(tmp_path, text):
    path = tmp_path / "perf.json"
    path.write_text(text)
    with pytest.raises(PerfMapError, match=rf"nested deeper than {MAX_JSON_DEPTH} levels"):
        PerfMap.load(path)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=rf"{tmp_path / 'manifest.json'}: .*nested deeper than"):
        Manifest.read(tmp_path)


def test_brackets_inside_strings_do_not_count(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"note": "' + "[{" * 5000 + '\\" ]]", "nested": [[[{"a": [1]}]]]}')
    assert read_json_object(path, PerfMapError, "")["nested"] == [[[{"a": [1]}]]]


def test_nesting_at_the_limit_is_read(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"a": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}")
    assert "a" in read_json_object(path, PerfMapError, "")


@pytest.mark.parametrize("command", [["inspect", "{dir}"], ["select", "--map", "{map}", "--batch", "1"],
                                     ["plot", "{map}", "--out", "{dir}/plots"]], ids=lambda c: c[0])
def test_commands_reading_deep_files_say_error_not_traceback(tmp_path, command):
    text = "[" * 100_000
    (tmp_path / "manifest.json").write_text(text)
    (tmp_path / "perf.json").write_text(text)
    argv = [part.format(dir=tmp_path, map=tmp_path / "perf.json") for part in command]
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Error:" in result.stderr
    assert "nested deeper than" in result.stderr
