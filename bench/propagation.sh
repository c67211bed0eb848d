#!/usr/bin/env bash
# Propagation benchmark: time from `kubectl apply` of a changed DatabasePortal
# to the change being enforced by both of its portals, on the local
# single-node cluster (e2e/local-node.sh) with the operator in-cluster.
#
#   bench/propagation.sh [--changes N] [--no-cargo] [--keep] [--dir DIR]
#
# Starts the node with e2e/local.sh up (images and binaries cached; with
# --dir, uses the node already running there from `e2e/local.sh up DIR`), one
# redis-server on the bridge address, and a DatabasePortal `bench` with two
# portals; then N times (default 50) applies the DatabasePortal with a new
# limits.maxConnections (1001, 1002, ...) and polls each portal pod's admin
# /status (POD_IP:8404, every 5 ms) until its `connections.max` — the limit
# its accept loop enforces — has the new value. Prints p50/p99/max of the
# time until both portals enforce it, the same for each portal, and how long
# `kubectl apply` itself took. Target: p99 <= 1 s. Needs root.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO
changes=50 cargo=1 keep=0 dir=
while [[ $# -gt 0 ]]; do
    case $1 in
        --changes) changes=${2:?}; shift ;;
        --no-cargo) cargo=0 ;;
        --keep) keep=1 ;;
        --dir) dir=${2:?}; shift ;;
        *) sed -n '2,16s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
    shift
done
[[ $changes =~ ^[0-9]+$ && $changes -ge 1 && $changes -le 1000 ]] || {
    echo "--changes: 1..1000" >&2
    exit 2
}

if [[ -n $dir ]]; then
    DIR=$(cd "$dir" && pwd -P)
    keep=1
else
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/dbportal-e2e.XXXXXX")
fi
REDIS_PID=
cleanup() {
    set +e
    [[ -z $REDIS_PID ]] || { kill "$REDIS_PID"; wait "$REDIS_PID"; } 2>/dev/null
    "$kubectl" delete namespace "$ns" --wait=false >/dev/null 2>&1
    if [[ $keep == 1 ]]; then
        echo "node kept: KUBECONFIG=$DIR/admin.kubeconfig; stop: e2e/local.sh down $DIR" >&2
    else
        "$REPO/e2e/local.sh" down "$DIR" >/dev/null 2>&1
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kubectl=kubectl
ns=bench-propagation-$$
if [[ -z $dir ]]; then
    up_args=(up "$DIR")
    [[ $cargo == 1 ]] || up_args+=(--no-cargo)
    # Owner watchdog: a killed benchmark does not leave the node behind.
    DBPORTAL_LCP_WATCH_PID=$([[ $keep == 1 ]] || echo $$) "$REPO/e2e/local.sh" "${up_args[@]}"
fi
eval "$("$REPO/e2e/local-node.sh" env "$DIR")"
kubectl=$DBPORTAL_K8S_BIN_DIR/kubectl

port=$(python3 -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$DBPORTAL_NODE_IP")
redis-server --bind "$DBPORTAL_NODE_IP" --port "$port" --save '' --appendonly no \
    --protected-mode no --dir "$DIR" </dev/null >"$DIR/redis.log" 2>&1 &
REDIS_PID=$!
echo "$REDIS_PID" >>"$DIR/e2e-redis.pids"

"$kubectl" create namespace "$ns" >/dev/null

python3 - "$kubectl" "$ns" "$DBPORTAL_NODE_IP:$port" "$changes" <<'PYEOF'
import json, subprocess, sys, time, urllib.request

kubectl, ns, backend, changes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def manifest(max_connections):
    return f"""apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata: {{name: bench, namespace: {ns}}}
spec:
  engine: redis
  backends: [{{name: redis, address: "{backend}"}}]
  routing: {{mode: first}}
  tls: {{mode: disabled}}
  limits: {{maxConnections: {max_connections}}}
  portal: {{replicas: 2}}
"""

def apply(max_connections):
    subprocess.run([kubectl, "apply", "-f", "-"], input=manifest(max_connections).encode(),
                   check=True, stdout=subprocess.DEVNULL)

def get(*args):
    return subprocess.run([kubectl, "-n", ns, "get", *args], check=True,
                          capture_output=True, text=True).stdout

def status(ip):
    with urllib.request.urlopen(f"http://{ip}:8404/status", timeout=2) as r:
        return json.load(r)

apply(1000)
deadline = time.monotonic() + 180
ips = []
while time.monotonic() < deadline:
    try:
        pods = json.loads(get("pods", "-l", "app.kubernetes.io/instance=bench", "-o", "json"))["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p["status"].get("conditions", []))]
        if len(ready) == 2:
            ips = sorted(p["status"]["podIP"] for p in ready)
            if all(status(ip)["connections"]["max"] == 1000 for ip in ips):
                break
    except Exception:
        pass
    time.sleep(0.5)
else:
    sys.exit("portal pods not Ready within 180 s")
print(f"portals {ips[0]}, {ips[1]} Ready; {changes} changes of limits.maxConnections", flush=True)

both, each, applies, after_apply, missed = [], [[], []], [], [], 0
for i in range(1, changes + 1):
    value = 1000 + i
    t0 = time.monotonic()
    apply(value)
    applies.append(time.monotonic() - t0)
    seen = [None, None]
    limit = time.monotonic() + 10
    while None in seen and time.monotonic() < limit:
        for k, ip in enumerate(ips):
            if seen[k] is None:
                try:
                    if status(ip)["connections"]["max"] == value:
                        seen[k] = time.monotonic() - t0
                except Exception:
                    pass
        time.sleep(0.005)
    if None in seen:
        missed += 1
        print(f"change {i}: not enforced by both portals within 10 s ({seen})", flush=True)
        continue
    for k in (0, 1):
        each[k].append(seen[k])
    both.append(max(seen))
    after_apply.append(max(seen) - applies[-1])
    time.sleep(0.1)

def pct(xs, p):
    xs = sorted(xs)
    # nearest rank
    return xs[max(0, -(-len(xs) * p // 100) - 1)]

def row(name, xs):
    if not xs:
        return f"{name:<34} (none)"
    ms = lambda s: f"{s * 1000:7.0f} ms"
    return f"{name:<34} p50 {ms(pct(xs, 50))}  p99 {ms(pct(xs, 99))}  max {ms(max(xs))}  min {ms(min(xs))}"

print()
print(row("apply -> both portals enforce", both))
print(row("apply -> portal A enforces", each[0]))
print(row("apply -> portal B enforces", each[1]))
print(row("kubectl apply itself", applies))
print(row("apply returned -> both enforce", after_apply))
with open("/proc/loadavg") as f:
    print("load average:", " ".join(f.read().split()[:3]))
print(f"changes: {changes}, enforced: {len(both)}, missed: {missed}; target p99 <= 1000 ms: "
      + ("met" if both and pct(both, 99) <= 1.0 and not missed else "MISSED"))
PYEOF
