"""The comparison page (docs/comparison.md) checked against what dbportal documents of itself:
every configuration field it names in backticks (`pooling.mode`, `backends[].weight`,
`adminTokenFile`, `routing.mode: roundrobin`) is a field of the configuration reference
(docs/configuration.md), and of the CRD (`spec` fields) or of the portal's configuration types
(the standalone keys), with a value the field takes; every admin endpoint verb it names
(`POST /backends/<name>/state`) is one the operations guide documents; every admin path it
names (`/metrics`) is documented.

A backticked name counts as a dbportal field when it is shaped like one: dotted lower camel
case segments, with `[]` after a list, optionally prefixed `spec.` or `status.`, optionally
followed by `: value`; and it has a capital letter (`allowedCIDRs`), a `[]`, a prefix, or a
dotted path whose first segment is a top-level field (`pooling.mode`). HAProxy's, PgBouncer's
and nutcracker's own names (`maxconn`, `auth_query`, `tcp-check`, `-v 4`) have no such shape."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_docs import CRD, DOCS, ROOT, SPEC_SCHEMA, crd_paths, table_keys  # noqa: E402

COMPARISON = DOCS / "comparison.md"
CONFIGURATION = (DOCS / "configuration.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()
STATUS_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]

SEGMENT = r"[a-z][A-Za-z0-9]*(?:\[\])?"
PATH = rf"{SEGMENT}(?:\.{SEGMENT})*"
FIELD = re.compile(rf"(?P<prefix>spec\.|status\.)?(?P<path>{PATH})(?::[ ]*(?P<value>[^\s`]+))?")
VERB = re.compile(r"(?P<method>GET|HEAD|POST|PUT|PATCH|DELETE) (?P<path>/\S*)")
ADMIN_PATH = re.compile(r"/[a-z;]*")
STANDALONE_HEADING = "## The standalone portal's extra keys"


def backticked(markdown):
    return re.findall(r"`([^`\n]+)`", markdown)


def spec_fields():
    """The `spec` fields of the configuration reference, without `spec.`: `backends[].weight`."""
    return {key[len("spec."):] for key in
            table_keys(CONFIGURATION, r"spec\.[A-Za-z0-9_.\[\]]+")}


def standalone_section():
    return CONFIGURATION.split(STANDALONE_HEADING, 1)[1].split("\n## ", 1)[0]


def standalone_keys():
    """The standalone portal's extra keys of the reference: `adminTokenFile`, `tls.certFile`."""
    return table_keys(standalone_section(), PATH)


def camel(name):
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def portal_config_keys():
    """The keys the portal's configuration types read: each field in camel case, and every
    serde `rename`."""
    keys = set()
    for path in (ROOT / "portal" / "src" / "config").glob("*.rs"):
        if path.name == "tests.rs":
            continue
        text = path.read_text()
        keys |= {camel(f) for f in re.findall(r"^\s*pub(?:\([^)]*\))?\s+([a-z_][a-z0-9_]*)\s*:",
                                              text, re.M)}
        keys |= set(re.findall(r'rename\s*=\s*"([A-Za-z][A-Za-z0-9]*)"', text))
    return keys


def top_level():
    return ({p.split(".")[0].removesuffix("[]") for p in spec_fields()}
            | {k.split(".")[0] for k in standalone_keys()} | {"spec", "status"})


def named_fields(markdown):
    """(token, prefix, path, value) for every backticked name shaped like a dbportal field."""
    tops = top_level()
    named = []
    for token in backticked(markdown):
        m = FIELD.fullmatch(token)
        if not m:
            continue
        prefix, path, value = m.group("prefix"), m.group("path"), m.group("value")
        first = path.split(".")[0].removesuffix("[]")
        if (prefix or "[]" in path or re.search(r"[A-Z]", path)
                or ("." in path and first in tops) or (value is not None and first in tops)):
            named.append((token, prefix, path, value))
    return named


def schema_at(schema, path):
    for segment in path.split("."):
        schema = schema.get("properties", {}).get(segment.removesuffix("[]"))
        if schema is None:
            return None
        if segment.endswith("[]"):
            schema = schema.get("items", {})
    return schema


def row(markdown, key):
    """The reference's table row whose first cell names `key`."""
    for line in markdown.splitlines():
        cell = re.match(r"^\|\s*(.*?)\s*\|", line)
        if cell and f"`{key}`" in cell.group(1):
            return line
    return ""


def value_error(token, schema, row_text, value):
    if schema and "enum" in schema:
        ok = value in [str(v) for v in schema["enum"]]
    elif schema and schema.get("type") == "boolean":
        ok = value in ("true", "false")
    elif schema and schema.get("type") == "integer":
        ok = re.fullmatch(r"\d+", value) is not None
    else:
        ok = f"`{value}`" in row_text
    return None if ok else f"`{token}`: {value!r} is not a value the reference gives this field"


def field_errors(markdown):
    """What `markdown` names as dbportal fields that the reference, the CRD or the portal's
    configuration types do not have, one message each."""
    spec, standalone = spec_fields(), standalone_keys()
    crd = {p[len("spec."):] for p in crd_paths()}
    status = {p[len("status."):] for p in crd_paths(STATUS_SCHEMA, "status")}
    portal_keys = portal_config_keys()
    errors = []
    for token, prefix, path, value in named_fields(markdown):
        if prefix == "status.":
            if path not in status:
                errors.append(f"`{token}`: not a status field of the CRD")
            continue
        if path in spec:
            if path not in crd:
                errors.append(f"`{token}`: in docs/configuration.md but not in the CRD")
            elif value is not None:
                errors.append(value_error(token, schema_at(SPEC_SCHEMA, path),
                                          row(CONFIGURATION, f"spec.{path}"), value))
        elif path in standalone and not prefix:
            missing = [s for s in path.split(".") if s not in portal_keys]
            if missing:
                errors.append(f"`{token}`: the portal's configuration types lack {missing}")
            elif value is not None:
                errors.append(value_error(token, None, row(standalone_section(), path), value))
        else:
            leaf = path.split(".")[-1]
            near = sorted(p for p in spec | standalone if p == leaf or p.endswith("." + leaf))
            errors.append(f"`{token}`: not a field of docs/configuration.md"
                          + (f" (did you mean {near}?)" if near else ""))
    return [e for e in errors if e]


def documented_verbs():
    """(method, path) of the admin verbs the operations guide shows: as
    `POST /backends/<name>/state` in backticks, or as a curl command line."""
    texts = [OPERATIONS]
    verbs = set()
    for text in texts:
        for token in backticked(text):
            if m := VERB.fullmatch(token):
                verbs.add((m.group("method"), m.group("path")))
    for line in re.findall(r"curl\b[^\n]*", OPERATIONS):
        path = re.search(r"localhost:\d+(/\S*)", line)
        if not path:
            continue
        method = re.search(r"-X\s*([A-Z]+)", line)
        method = method.group(1) if method else \
            "POST" if re.search(r"\s(-d|--data\S*)\s", line) else "GET"
        verbs.add((method, path.group(1)))
    return verbs


def path_pattern(path):
    """`/backends/<name>/state` as a pattern in which `<name>` stands for any one segment."""
    return "".join(r"[^/\s]+" if part.startswith("<") else re.escape(part)
                   for part in re.split(r"(<[^>/]+>)", path) if part)


def verb_errors(markdown):
    documented = documented_verbs()
    errors = []
    for token in backticked(markdown):
        if m := VERB.fullmatch(token):
            method, path = m.group("method"), m.group("path")
            if not any(method == dm and (re.fullmatch(path_pattern(path), dp)
                                         or re.fullmatch(path_pattern(dp), path))
                       for dm, dp in documented):
                errors.append(f"`{token}`: not an admin verb docs/operations.md documents")
        elif ADMIN_PATH.fullmatch(token):
            docs = OPERATIONS + CONFIGURATION
            if f"`{token}`" not in docs and not any(p == token for _, p in documented):
                errors.append(f"`{token}`: not an admin path the docs document")
    return errors


def test_the_readers_see_the_reference():
    spec, standalone, keys = spec_fields(), standalone_keys(), portal_config_keys()
    assert {"pooling.mode", "backends[].weight", "routing.closeSessionsOnLeaderChange",
            "allowedCIDRs"} <= spec
    assert {"adminTokenFile", "adminLimits.maxConnections", "tls.certFile", "tls.keyFile",
            "pooling.auth.usersFile"} <= standalone
    assert {"adminTokenFile", "allowedCIDRs", "maxConnections", "certFile", "usersFile"} <= keys
    verbs = documented_verbs()
    assert {("POST", "/backends/orders-1/state"), ("POST", "/sessions/close"),
            ("DELETE", "/backends/orders-1/state"), ("GET", "/")} <= verbs


def test_comparison_names_only_documented_fields():
    text = COMPARISON.read_text()
    named = named_fields(text)
    # The page names the features it compares by their fields; so that a reader that finds
    # nothing cannot pass, it must find them.
    paths = {path for _, _, path, _ in named}
    assert {"pooling.mode", "backends[].weight", "backends[].state", "adminTokenFile",
            "allowedCIDRs"} <= paths, sorted(paths)
    errors = field_errors(text)
    assert not errors, "docs/comparison.md names fields dbportal does not document:\n" + \
        "\n".join(errors)


def test_comparison_names_only_documented_admin_verbs():
    text = COMPARISON.read_text()
    verbs = [t for t in backticked(text) if VERB.fullmatch(t)]
    assert len(verbs) >= 3, verbs
    errors = verb_errors(text)
    assert not errors, "docs/comparison.md names admin verbs dbportal does not document:\n" + \
        "\n".join(errors)


@pytest.mark.parametrize("token", [
    "pooling.bogus", "spec.pooling.bogus", "backends[].bogus", "bogusField", "limits.maxConns",
    "routing.mode: bogus", "backends[].state: paused", "proxyProtocol.accept: maybe",
    "adminLimits.bogus", "status.bogus", "pooling.mode[]",
])
def test_a_made_up_field_fails(token):
    assert field_errors(f"dbportal has `{token}`.")


@pytest.mark.parametrize("token", [
    "POST /backends/<name>/bogus", "PUT /backends/<name>/state", "GET /bogus", "POST /reload",
    "/bogus",
])
def test_a_made_up_admin_verb_fails(token):
    assert verb_errors(f"dbportal has `{token}`.")


@pytest.mark.parametrize("token", [
    "pooling.mode: transaction", "routing.mode: roundrobin", "backends[].state: drain",
    "spec.tls.issuerRef.name", "proxyProtocol.accept: true", "tls.certFile",
    "POST /backends/<name>/weight", "DELETE /backends/<name>/state", "GET /", "/metrics",
    # not dbportal's: HAProxy's, PgBouncer's and nutcracker's names are not checked
    "maxconn", "auth_query", "tcp-check", "-v 4", "inter 1s", "tune.bufsize",
])
def test_real_fields_and_other_tools_names_pass(token):
    assert not field_errors(f"`{token}`") and not verb_errors(f"`{token}`")
