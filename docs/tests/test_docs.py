"""The docs checked against the code: the configuration reference against the CRD, the
metrics reference against the metrics the binaries export, the operations guide against the
Degraded reasons and the chart's alerts, and every DatabasePortal example against the CRD."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "charts" / "tests"))

import code_metrics  # noqa: E402
from crd_schema import openapi_to_jsonschema  # noqa: E402

CRD = yaml.safe_load((ROOT / "crds" / "databaseportal.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def crd_paths(schema=SPEC_SCHEMA, path="spec"):
    """Every field path under spec: `spec.tls.mode`, `spec.backends[].name`."""
    paths = set()
    if schema.get("type") == "array" and "properties" in schema.get("items", {}):
        return crd_paths(schema["items"], path + "[]")
    for key, sub in schema.get("properties", {}).items():
        paths.add(f"{path}.{key}")
        paths |= crd_paths(sub, f"{path}.{key}")
    return paths


def table_keys(markdown, pattern):
    """The backticked names in the first column of the Markdown tables."""
    keys = set()
    for line in markdown.splitlines():
        cell = re.match(r"^\|\s*(.*?)\s*\|", line)
        if cell:
            keys.update(re.findall(rf"`({pattern})`", cell.group(1)))
    return keys


def test_configuration_reference_matches_the_crd():
    documented = table_keys((DOCS / "configuration.md").read_text(), r"spec\.[A-Za-z0-9_.\[\]]+")
    fields = crd_paths()
    assert len(fields) > 40
    assert not fields - documented, f"CRD fields missing in docs/configuration.md: " \
                                    f"{sorted(fields - documented)}"
    assert not documented - fields, f"docs/configuration.md lists fields the CRD lacks: " \
                                    f"{sorted(documented - fields)}"


def test_metrics_reference_matches_the_code():
    exported = code_metrics.all_metrics()
    assert len(code_metrics.portal_metrics()) >= 30 and len(code_metrics.operator_metrics()) >= 6
    documented = table_keys((DOCS / "metrics.md").read_text(), r"dbportal_[a-z0-9_]+")
    assert not set(exported) - documented, f"metrics missing in docs/metrics.md: " \
                                           f"{sorted(set(exported) - documented)}"
    assert not documented - set(exported), f"docs/metrics.md lists metrics the code lacks: " \
                                           f"{sorted(documented - set(exported))}"


def test_every_metric_name_in_the_code_is_seen_by_the_readers():
    # A metric written some other way than the two readers know would escape the check above.
    prefix = "dbportal_operator"
    unknown = code_metrics.literal_tokens() - code_metrics.series_names() - {prefix}
    assert not unknown, f"metric-like names the readers in code_metrics.py miss: {unknown}"


def degraded_reasons():
    text = (ROOT / "operator" / "src" / "conditions.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "(\w+)";', text))
    rank = re.search(r"pub fn rank\(reason: &str\) -> u8 \{(.*?)\n    \}", text, re.S).group(1)
    return [consts[c] for c in re.findall(r"([A-Z][A-Z_]*) => \d+", rank)]


def headings(path):
    return re.findall(r"^#+ (.+)$", path.read_text(), re.M)


def test_operations_guide_covers_every_degraded_reason():
    reasons = degraded_reasons()
    assert "InvalidSpec" in reasons and len(reasons) >= 7
    titles = " ".join(headings(DOCS / "operations.md"))
    missing = [r for r in reasons if f"`{r}`" not in titles]
    assert not missing, f"Degraded reasons without a section in docs/operations.md: {missing}"
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{r}`" in readme for r in reasons)


def test_operations_guide_has_a_runbook_per_alert():
    rules = yaml.safe_load((ROOT / "charts" / "dbportal" / "files" / "prometheus-rules.yaml")
                           .read_text())
    alerts = [r["alert"] for g in rules for r in g["rules"]]
    assert len(alerts) >= 6
    titles = headings(DOCS / "operations.md")
    assert not [a for a in alerts if a not in titles]


def yaml_blocks(path):
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)


EXAMPLE_FILES = ["README.md", "docs/configuration.md", "docs/operations.md",
                 "docs/architecture.md", "docs/comparison.md"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_database_portal_examples_are_valid(name):
    spec_schema = openapi_to_jsonschema(SPEC_SCHEMA)
    checked = 0
    for block in yaml_blocks(ROOT / name):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") == "DatabasePortal":
                assert doc["apiVersion"] == "dbportal.dev/v1alpha1"
                assert re.fullmatch(r"[a-z][-a-z0-9]{0,44}", doc["metadata"]["name"])
                jsonschema.validate(doc["spec"], spec_schema)
                checked += 1
    if name in ("README.md", "docs/configuration.md"):
        assert checked >= 1, f"no DatabasePortal example in {name}"


def test_readme_on_a_cluster_path():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    for needed in ("helm install", "--server-side", "redis-cli --tls", "sslmode=verify-full",
                   "selfSigned: {}", "mode: disabled"):
        assert needed in section, needed
    assert re.search(r"kubectl (-n \S+ )?get dbp", section)
    docs = [d for b in re.findall(r"```yaml\n(.*?)```", section, re.S)
            for d in yaml.safe_load_all(b) if d]
    kinds = [d["kind"] for d in docs]
    assert "Issuer" in kinds and "DatabasePortal" in kinds
    issuer = next(d for d in docs if d["kind"] == "Issuer")
    portal = next(d for d in docs if d["kind"] == "DatabasePortal")
    assert issuer["apiVersion"] == "cert-manager.io/v1" and issuer["spec"] == {"selfSigned": {}}
    assert portal["spec"]["tls"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert issuer["metadata"].get("namespace") == portal["metadata"].get("namespace")


def test_relative_links_resolve():
    broken = []
    for path in [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md",
                 *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_license_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    cargo = (ROOT / "Cargo.toml").read_text()
    assert 'license = "Apache-2.0"' in cargo
    debian = Path("/usr/share/common-licenses/Apache-2.0")
    if debian.exists():
        assert text.split("END OF TERMS AND CONDITIONS")[0].split() == \
            debian.read_text().split("END OF TERMS AND CONDITIONS")[0].split()
