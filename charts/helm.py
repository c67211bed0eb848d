#!/usr/bin/env python3
"""`helm` for the commands the project's docs give, on Helm 4's own library (PyPI
helm-python-sdk, the same as charts/render.py), so that the tests run the README's install
commands word for word where Helm's binary is not installed (it is no Debian package):

    helm install NAME CHART [-n NS] [--create-namespace] [-f FILE]... [--set K=V]...
                 [--set-string K=V]... [--set-json K=JSON]... [--timeout DURATION]
    helm upgrade NAME CHART [-n NS] [--reuse-values] [-f ...] [--set ...]
    helm uninstall NAME [-n NS] [--wait]
    helm show crds CHART
    helm status NAME [-n NS]

CHART is a local chart directory (the docs install from a checkout). The cluster is the one
KUBECONFIG names, as for helm. `charts/bin/helm` runs this with the virtualenv's python
(charts/venv.sh). Errors print as helm prints them (`Error: ...`, exit status 1).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import helm_python as helm
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (merge and the --set parsing, shared with render.py)


def seconds(duration: str) -> int:
    """A Go duration as helm takes it (`5m0s`, `90s`, `2m`) in whole seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise SystemExit(f"Error: invalid duration {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def value_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--values", "-f", action="append", default=[], metavar="FILE")
    for flag in ("--set", "--set-string", "--set-json"):
        p.add_argument(flag, action="append", default=[], metavar="K=V",
                       dest=flag[2:].replace("-", "_"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="helm")
    p.add_argument("--namespace", "-n", default=None)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("install", "upgrade"):
        c = sub.add_parser(name)
        c.add_argument("release")
        c.add_argument("chart")
        c.add_argument("--namespace", "-n", default=argparse.SUPPRESS)
        c.add_argument("--create-namespace", action="store_true")
        c.add_argument("--timeout", default="5m0s")
        value_flags(c)
        if name == "upgrade":
            c.add_argument("--reuse-values", action="store_true")
    c = sub.add_parser("uninstall")
    c.add_argument("release")
    c.add_argument("--namespace", "-n", default=argparse.SUPPRESS)
    c.add_argument("--wait", action="store_true")
    c = sub.add_parser("status")
    c.add_argument("release")
    c.add_argument("--namespace", "-n", default=argparse.SUPPRESS)
    c = sub.add_parser("show")
    c.add_argument("what", choices=["crds"])
    c.add_argument("chart")
    args = p.parse_args(argv)
    args.namespace = args.namespace or "default"
    return args


def chart_dir(ref: str) -> Path:
    path = Path(ref)
    if not (path / "Chart.yaml").is_file():
        raise SystemExit(f"Error: {ref}: only a local chart directory is supported here")
    return path


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "show":
        for crd in render.crds(chart_dir(args.chart)):
            print("---")
            sys.stdout.write(yaml.safe_dump(crd, sort_keys=False))
        return 0
    with helm.Config(namespace=args.namespace) as cfg:
        if args.command == "uninstall":
            cfg.uninstall(args.release, wait="watcher" if args.wait else None)
            print(f'release "{args.release}" uninstalled')
            return 0
        if args.command == "status":
            summary(cfg.status(args.release))
            return 0
        values = render.user_values(args)
        chart = chart_dir(args.chart)
        if args.command == "install":
            release = cfg.install(chart, args.release, values, namespace=args.namespace,
                                  create_namespace=args.create_namespace,
                                  timeout=seconds(args.timeout))
        else:
            release = cfg.upgrade(chart, args.release, values, namespace=args.namespace,
                                  reuse_values=args.reuse_values,
                                  timeout=seconds(args.timeout))
    summary(release)
    return 0


def summary(release: dict) -> None:
    """The head of what helm prints after install, upgrade and status."""
    print(f"NAME: {release.get('name')}\nNAMESPACE: {release.get('namespace')}\n"
          f"STATUS: {release.get('status')}\nREVISION: {release.get('revision')}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
