#!/usr/bin/env python3
"""Renders charts/dbportal with Helm's own library (PyPI helm-python-sdk, Helm 4) and prints
the manifests as one multi-document YAML stream, in Helm's install order.

    render.py [--name NAME] [--namespace NS] [-f VALUES.yaml]... [--set K=V]...
              [--set-string K=V]... [--set-json K=JSON]... [--crds] [--create-namespace]
              [--kube-version 1.20.0] [--api-versions GROUP/VERSION[/KIND]]...

Defaults: release dbportal in namespace dbportal-system (objects named dbportal-operator).
Values are merged as `helm install` merges them: the chart's values.yaml, then each -f file,
then the --set* flags in order; values.schema.json is enforced, so an unknown key or a wrong
type fails (exit status 1, the schema's message on stderr). --crds prints the chart's CRDs
first (Helm installs them from crds/ before the templates); --create-namespace prints the
release Namespace first. The Python that runs this needs the pinned packages of
charts/requirements.txt: `bash charts/venv.sh` creates that virtualenv and prints its python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
from helm_python import _native
import yaml

CHART = Path(__file__).resolve().parent / "dbportal"

# Helm's install order (pkg/release/util/kind_sorter.go), for the kinds a chart may hold.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge as Helm coalesces user values: maps merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render(
    values: dict[str, Any] | None = None,
    *,
    name: str = "dbportal",
    namespace: str = "dbportal-system",
    kube_version: str | None = None,
    api_versions: list[str] | None = None,
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """The chart's objects for these user values, in install order.

    Renders strictly (a template reading a missing value fails). Raises helm_python's
    HelmValuesError when the values break the schema, HelmRenderError when a template fails.
    """
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "is_install": True,
        "strict": True,
    }
    if kube_version:
        opts["kube_version"] = kube_version
    if api_versions:
        opts["api_versions"] = api_versions
    with helm.Chart.load(chart) as loaded:
        # Chart.render() does not pass kube_version, api_versions nor strict; the library's
        # render call takes them, so it is called directly with the same arguments.
        rendered = json.loads(
            _native.call_string(
                "helm_render", loaded._raw(), json.dumps(values or {}), json.dumps(opts)
            )
        )
    objects = []
    for template in sorted(rendered):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[template]):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return sort_objects(objects)


def notes(values: dict[str, Any] | None = None, *, name: str = "dbportal",
          namespace: str = "dbportal-system") -> str:
    """NOTES.txt as `helm install` prints it."""
    with helm.Chart.load(CHART) as loaded:
        rendered = loaded.render(values or {}, name=name, namespace=namespace, is_install=True)
    return next(v for k, v in rendered.items() if k.endswith("NOTES.txt"))


def crds(chart: Path = CHART) -> list[dict[str, Any]]:
    """The CRDs of the chart's crds/ directory."""
    with helm.Chart.load(chart) as loaded:
        return [doc for crd in loaded.crds for doc in yaml.safe_load_all(crd["data"]) if doc]


def sort_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(obj: dict[str, Any]) -> tuple[int, str]:
        kind = obj.get("kind", "")
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        return rank, obj["metadata"].get("name", "")

    return sorted(objects, key=key)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Print charts/dbportal rendered by Helm's library, as multi-document YAML.")
    p.add_argument("--name", default="dbportal", help="release name (default dbportal)")
    p.add_argument("--namespace", "-n", default="dbportal-system",
                   help="release namespace (default dbportal-system)")
    p.add_argument("--values", "-f", action="append", default=[], metavar="FILE",
                   help="a values file (repeatable)")
    for flag, what in (("--set", "a value, Helm --set syntax"),
                       ("--set-string", "a value kept as a string"),
                       ("--set-json", "a value given as JSON")):
        p.add_argument(flag, action="append", default=[], metavar="K=V",
                       dest=flag[2:].replace("-", "_"), help=f"{what} (repeatable)")
    p.add_argument("--crds", action="store_true", help="print the chart's CRDs first")
    p.add_argument("--create-namespace", action="store_true",
                   help="print the release Namespace first")
    p.add_argument("--kube-version", help="Kubernetes version for .Capabilities, e.g. 1.20.0")
    p.add_argument("--api-versions", action="append", default=[],
                   help="an extra API version for .Capabilities (repeatable)")
    return p.parse_args(argv)


def user_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in args.values:
        values = merge(values, helm.values_from_yaml(Path(path).read_text()))
    # The --set flags are applied in the order Helm applies them.
    for parse, exprs in ((helm.parse_set_string, args.set),
                         (helm.parse_set_string_values, args.set_string),
                         (helm.parse_set_json, args.set_json)):
        for expr in exprs:
            values = merge(values, parse(expr))
    return values


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        objects = render(user_values(args), name=args.name, namespace=args.namespace,
                         kube_version=args.kube_version, api_versions=args.api_versions)
    except helm.HelmError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    if args.crds:
        objects = crds() + objects
    if args.create_namespace:
        objects.insert(0, {"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": args.namespace}})
    try:
        yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, explicit_start=True)
        sys.stdout.flush()
    except BrokenPipeError:  # `render.py | head`: the reader has all it wanted
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
