#!/usr/bin/env python3
"""The API server's own ceiling for what the operator benchmark asks of it.

Server-side-applies, with no operator involved, the children the operator makes for one
DatabasePortal (dumped from a real reconcile: ConfigMap, StatefulSet, 3 Services,
ServiceAccount, Role, RoleBinding, PodDisruptionBudget) for N portal names, with C requests in
flight, through the same API server; prints the time. The operator cannot converge N
DatabasePortals faster than this on the same machine.

    bench/apiserver_ceiling.py KUBECONFIG CHILDREN.json N CONCURRENCY NAMESPACES...

CHILDREN.json: `kubectl get ... -o json` of one DatabasePortal's children named `tmpl-portal*`
in namespace `bench-0`. Owner references are dropped (the owner does not exist here, and the
garbage collector would delete the objects), as are server-set fields.
"""

import concurrent.futures
import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse

PLURAL = {
    "ConfigMap": "configmaps",
    "StatefulSet": "statefulsets",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


def kubeconfig(path):
    server = token = None
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line.startswith("server:"):
            server = line.split(None, 1)[1]
        elif line.startswith("token:"):
            token = line.split(None, 1)[1]
    if not server or not token:
        sys.exit(f"{path}: needs a server and a token user")
    return urllib.parse.urlparse(server), token


def template(obj):
    meta = obj["metadata"]
    obj["metadata"] = {
        k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta
    }
    obj.pop("status", None)
    spec = obj.get("spec", {})
    if obj["kind"] == "Service":
        for key in ("clusterIP", "clusterIPs"):
            spec.pop(key, None)
    if obj["kind"] == "ServiceAccount":
        obj.pop("secrets", None)
    return json.dumps(obj)


def path(obj):
    group_version = obj["apiVersion"]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    meta = obj["metadata"]
    return (
        f"{prefix}/namespaces/{meta['namespace']}/{PLURAL[obj['kind']]}/{meta['name']}"
        "?fieldManager=dbportal-ceiling&force=true"
    )


def main():
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    url, token = kubeconfig(sys.argv[1])
    items = json.load(open(sys.argv[2], encoding="utf-8"))["items"]
    n, concurrency = int(sys.argv[3]), int(sys.argv[4])
    namespaces = sys.argv[5:]
    templates = [template(o) for o in items]

    requests = []
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        for body in templates:
            text = body.replace("tmpl", f"c{i}").replace("bench-0", ns)
            requests.append((path(json.loads(text)), text.encode()))

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    local = threading.local()

    def send(request):
        target, body = request
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPSConnection(url.hostname, url.port, context=context)
        started = time.monotonic()
        local.conn.request(
            "PATCH",
            target,
            body=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/apply-patch+yaml",
            },
        )
        response = local.conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{target}: {response.status} {payload[:300]!r}")
        return time.monotonic() - started

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(send, requests))
    elapsed = time.monotonic() - started
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(
        f"applied {len(requests)} children of {n} portals with {concurrency} in flight: "
        f"{elapsed:.1f} s ({len(requests) / elapsed:.0f}/s), "
        f"latency p50 {p(0.5) * 1000:.0f} ms p99 {p(0.99) * 1000:.0f} ms max {latencies[-1] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
