"""A strict reader of the Prometheus text exposition format (0.0.4), for the serve tests: every
line is checked as it is parsed, and histograms must be cumulative with a +Inf bucket. Bucket bounds
are read as numbers and shown in their shortest form (``le="1"``, ``"0.005"``, ``"+Inf"``), however
the exposition wrote them (``1`` or ``1.0``)."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import httpx

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, dict]:
    """family -> {"type", "help", "samples": [(name, labels, value)]}, asserting the format line by line."""
    families: dict[str, dict] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} declared twice"
            families[name] = current = {"help": help_text, "type": None, "samples": []}
            current["name"] = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current["name"] == name, f"TYPE for {name} without its HELP first"
            assert kind in ("counter", "gauge", "histogram", "summary"), line
            current["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, label_text, value = match.groups()
            assert current is not None and current["type"], f"sample before HELP/TYPE: {line!r}"
            suffixes = SUFFIXES.get(current["type"], ("",))
            assert any(name == current["name"] + s for s in suffixes), f"{name} outside family {current['name']}"
            labels = dict(LABEL.findall(label_text or ""))
            if "le" in labels:
                labels["le"] = bound_text(float(labels["le"]))
            families[current["name"]]["samples"].append((name, labels, float(value)))
    for family in families.values():
        if family["type"] == "histogram":
            check_histogram(family)
    return families


def bound_text(bound: float) -> str:
    return "+Inf" if bound == math.inf else f"{bound:g}"


def check_histogram(family: dict) -> None:
    name = family["name"]
    series = defaultdict(lambda: {"buckets": [], "sum": None, "count": None})
    for sample, labels, value in family["samples"]:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if sample.endswith("_bucket"):
            series[key]["buckets"].append((float(labels["le"]), value))
        else:
            series[key][sample.rsplit("_", 1)[1]] = value
    for key, parts in series.items():
        bounds = [b for b, _ in parts["buckets"]]
        counts = [c for _, c in parts["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}{key}: bucket bounds {bounds}"
        assert counts == sorted(counts), f"{name}{key}: buckets not cumulative {counts}"
        assert parts["count"] == counts[-1], f"{name}{key}: _count {parts['count']} != +Inf bucket {counts[-1]}"
        assert parts["sum"] is not None


def metric_value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    return sum(value for name, sample_labels, value in families[family]["samples"]
               if name == (sample or family) and all(sample_labels.get(k) == v for k, v in labels.items()))


def scrape(client: httpx.Client, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)
