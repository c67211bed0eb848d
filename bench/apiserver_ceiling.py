#!/usr/bin/env python3
"""The API server's own ceiling for what the operator benchmark asks of it.

Server-side-applies, with no operator involved, the children the operator makes for one
DatabasePortal (dumped from a real reconcile: ConfigMap, StatefulSet, 3 Services,
ServiceAccount, Role, RoleBinding, PodDisruptionBudget) for N portal names, with C requests in
flight, through the same API server; prints the time. The operator cannot converge N
DatabasePortals faster than this on the same machine.

    bench/apiserver_ceiling.py KUBECONFIG CHILDREN.json N CONCURRENCY NAMESPACES...
    bench/apiserver_ceiling.py --floor KUBECONFIG CHILDREN.json N CONCURRENCY NAMESPACES...

CHILDREN.json: `kubectl get ... -o json` of one DatabasePortal's children named `tmpl-portal*`
in namespace `bench-0`. Owner references are dropped (the owner does not exist here, and the
garbage collector would delete the objects), as are server-set fields.

--floor: every write the contract asks for to converge N DatabasePortals, as the operator
benchmark makes them: CHILDREN.json also holds the reconciled DatabasePortal `tmpl`; first the
N DatabasePortals are created (32 in flight, as the benchmark's client does), then per portal,
C portals at a time: its 9 children applied (owned by it, so the garbage collector sees what it
sees with the operator), its status written (observedGeneration 1) and one event created.
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
    args = sys.argv[1:]
    floor = args[:1] == ["--floor"]
    if floor:
        args = args[1:]
    if len(args) < 5:
        sys.exit(__doc__)
    url, token = kubeconfig(args[0])
    items = json.load(open(args[1], encoding="utf-8"))["items"]
    n, concurrency = int(args[2]), int(args[3])
    namespaces = args[4:]
    if floor:
        return contract_floor(url, token, items, n, concurrency, namespaces)
    templates = [template(o) for o in items]

    requests = []
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        for body in templates:
            text = body.replace("tmpl", f"c{i}").replace("bench-0", ns)
            requests.append((path(json.loads(text)), text.encode()))

    send = sender(url, token)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(lambda r: send("PATCH", *r)[0], requests))
    elapsed = time.monotonic() - started
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(
        f"applied {len(requests)} children of {n} portals with {concurrency} in flight: "
        f"{elapsed:.1f} s ({len(requests) / elapsed:.0f}/s), "
        f"latency p50 {p(0.5) * 1000:.0f} ms p99 {p(0.99) * 1000:.0f} ms max {latencies[-1] * 1000:.0f} ms"
    )


APPLY = "application/apply-patch+yaml"


def sender(url, token):
    """send(method, path, body, content_type) -> (seconds, response body); one connection per
    thread."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    local = threading.local()

    def send(method, target, body, content_type=APPLY):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPSConnection(url.hostname, url.port, context=context)
        started = time.monotonic()
        local.conn.request(
            method,
            target,
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        )
        response = local.conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{target}: {response.status} {payload[:300]!r}")
        return time.monotonic() - started, payload

    return send


def contract_floor(url, token, items, n, concurrency, namespaces):
    portal = next(o for o in items if o["kind"] == "DatabasePortal")
    children = [template(o) for o in items if o["kind"] != "DatabasePortal"]
    spec = json.dumps({"apiVersion": portal["apiVersion"], "kind": portal["kind"],
                       "metadata": {"name": "tmpl", "namespace": "bench-0"},
                       "spec": portal["spec"]})
    status = json.dumps({"status": dict(portal["status"], observedGeneration=1)})
    send = sender(url, token)
    dbp_path = "/apis/dbportal.dev/v1alpha1/namespaces/{ns}/databaseportals"
    latencies = []

    def create(i):
        ns = namespaces[i % len(namespaces)]
        body = spec.replace("tmpl", f"c{i}").replace("bench-0", ns)
        took, payload = send("POST", dbp_path.format(ns=ns), body.encode(), "application/json")
        latencies.append(took)
        return json.loads(payload)["metadata"]["uid"]

    def converge(i, uid):
        ns = namespaces[i % len(namespaces)]
        owner = [{"apiVersion": portal["apiVersion"], "kind": portal["kind"], "name": f"c{i}",
                  "uid": uid, "controller": True, "blockOwnerDeletion": True}]
        for body in children:
            obj = json.loads(body.replace("tmpl", f"c{i}").replace("bench-0", ns))
            obj["metadata"]["ownerReferences"] = owner
            latencies.append(send("PATCH", path(obj), json.dumps(obj).encode())[0])
        target = f"{dbp_path.format(ns=ns)}/c{i}/status"
        latencies.append(
            send("PATCH", target, status.encode(), "application/merge-patch+json")[0])
        now = time.time()
        event = {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": f"c{i}.{int(now * 1e9):x}", "namespace": ns},
            "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now)),
            "type": "Normal", "reason": "Created", "action": "Create",
            "note": "created ConfigMap, StatefulSet (2 portals), 3 Services, RBAC, "
                    "PodDisruptionBudget",
            "regarding": {"apiVersion": portal["apiVersion"], "kind": portal["kind"],
                          "name": f"c{i}", "namespace": ns, "uid": uid},
            "reportingController": "dbportal-operator", "reportingInstance": "ceiling",
        }
        latencies.append(send("POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events",
                              json.dumps(event).encode(), "application/json")[0])

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        uids = list(pool.map(create, range(n)))
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(converge, range(n), uids))
    elapsed = time.monotonic() - started
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(
        f"contract floor: {len(latencies)} writes for {n} portals (create, 9 children, status, "
        f"event each) with {concurrency} portals in flight: {elapsed:.1f} s "
        f"({len(latencies) / elapsed:.0f}/s), latency p50 {p(0.5) * 1000:.0f} ms "
        f"p99 {p(0.99) * 1000:.0f} ms max {latencies[-1] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
