"""The metric names the operator and the portal export, read from their Rust sources, so that
the alerts, the dashboard and docs/metrics.md can be checked against what the code serves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Suffixes Prometheus adds to a summary's or a histogram's series.
SERIES_SUFFIXES = ("_sum", "_count", "_bucket")


def portal_metrics() -> dict[str, str]:
    """name -> type of every family the portal's /metrics writes: the collectors' calls of the
    helpers in `portal/src/metrics.rs` (`counter(e, "name", ...)`, `gauges(...)`,
    `histogram(...)`) and of `bucketed_histogram(...)` in `portal/src/session/hub.rs`; the
    encoder adds `_total` to counters."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "portal" / "src").rglob("*.rs")):
        text = path.read_text()
        for helper, name in re.findall(
                r'\b(?:bucketed_)?(counters?|gauges?|histograms?)\(\s*&?(?:mut )?\w+,\s*"(dbportal_\w+)"', text):
            kind = helper.rstrip("s")
            found[name + ("_total" if kind == "counter" else "")] = kind
    return found


def operator_metrics() -> dict[str, str]:
    """name -> type of every metric the operator's registry holds: its prefix, each
    `registry.register("name", ...)` and the field's type; prometheus-client adds `_total`
    to counters."""
    text = (ROOT / "operator" / "src" / "metrics.rs").read_text()
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', text).group(1)
    struct = re.search(r"pub struct Metrics \{(.*?)\n\}", text, re.S).group(1)
    fields = dict(re.findall(r"^\s*(\w+): (.+),$", struct, re.M))
    found: dict[str, str] = {}
    for name, var in re.findall(
            r'registry\.register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*(\w+)\.clone\(\)', text):
        ty = fields[var]
        # The metric type is the last word: Counter, Family<Labels, Counter>, Histogram...
        kind = re.findall(r"\w+", ty)[-1]
        full = f"{prefix}_{name}" + ("_total" if kind == "Counter" else "")
        found[full] = kind.lower()
    return found


def all_metrics() -> dict[str, str]:
    return {**portal_metrics(), **operator_metrics()}


def series_names() -> set[str]:
    """Every series name a query may use: the families plus their summary/histogram series."""
    names = set()
    for name, kind in all_metrics().items():
        names.add(name)
        if kind == "counter":
            # The family's own name, as its `# TYPE` line gives it (OpenMetrics).
            names.add(name.removesuffix("_total"))
        if kind in ("summary", "histogram"):
            names.update(name + s for s in SERIES_SUFFIXES)
    return names


def literal_tokens() -> set[str]:
    """Every `dbportal_...` word inside a string literal of the two crates' sources (outside
    their test files), to catch a metric written in a way the two readers above miss."""
    tokens = set()
    for crate in ("portal", "operator"):
        for path in sorted((ROOT / crate / "src").rglob("*.rs")):
            if path.name in ("tests.rs", "mock_tests.rs") or "tests" in path.parts:
                continue
            text = path.read_text()
            # Drop the unit-test modules at the end of a file.
            text = text.split("#[cfg(test)]")[0]
            for literal in re.findall(r'"(?:[^"\\]|\\.)*"', text):
                tokens.update(re.findall(r"\bdbportal_[a-z0-9_]+", literal))
    return tokens
