#!/usr/bin/env bash
# The API server's ceiling for the operator benchmark: how long the local control plane takes
# to server-side-apply the children of N DatabasePortals with no operator involved.
#
#   bench/apiserver_ceiling.sh [--floor] [N] [CONCURRENCY...]     (defaults: 1000, 16)
#
# --floor: every write the contract asks for (the DatabasePortals' creation, their children,
# one status write and one event each), see bench/apiserver_ceiling.py.
#
# Starts a private control plane (as bench/operator.sh does), lets the release operator
# reconcile one DatabasePortal to get its exact children, stops the operator, then for each
# CONCURRENCY starts a fresh control plane and applies those children for N names
# (bench/apiserver_ceiling.py). Figures are recorded in bench/OPERATOR.md.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=()
if [[ ${1:-} == --floor ]]; then
    floor=(--floor)
    shift
fi
n=${1:-1000}
shift || true
concurrencies=("${@:-16}")
export DBPORTAL_LCP_SERVICE_CIDR=${DBPORTAL_LCP_SERVICE_CIDR:-10.96.0.0/16}
# DBPORTAL_OPERATOR_BIN: an operator binary already built (skips the build).
operator=${DBPORTAL_OPERATOR_BIN:-}
if [[ -z $operator ]]; then
    cargo build --release -p dbportal-operator --bin operator
    operator=target/release/operator
fi
kubectl=$(e2e/local-control-plane.sh bin-dir)/kubectl
work=$(mktemp -d "${TMPDIR:-/tmp}/dbportal-ceiling.XXXXXX")
plane=$work/plane
operator_pid=
cleanup() {
    [[ -z $operator_pid ]] || kill "$operator_pid" 2>/dev/null || true
    e2e/local-control-plane.sh stop "$plane" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

namespaces=()
for i in $(seq 0 9); do namespaces+=("bench-$i"); done

start_plane() {
    e2e/local-control-plane.sh stop "$plane" 2>/dev/null || true
    rm -rf "$plane"
    KUBECONFIG=$(e2e/local-control-plane.sh start "$plane" crds/databaseportal.yaml 2>"$work/start.log" | tail -n1)
    export KUBECONFIG
    for ns in "${namespaces[@]}" dbportal-system; do "$kubectl" create namespace "$ns" >/dev/null; done
}

# CPU seconds the whole machine spent busy (not idle or waiting for I/O), from /proc/stat.
busy_cpu_seconds() {
    awk '/^cpu / {print ($2 + $3 + $4 + $7 + $8 + $9) / 100; exit}' /proc/stat
}

start_plane
"$kubectl" apply -f - >/dev/null <<'EOF'
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata: {name: tmpl, namespace: bench-0}
spec:
  engine: redis
  backends:
  - {name: a, address: "tmpl-0.tmpl.bench-0.svc:6379"}
  - {name: b, address: "tmpl-1.tmpl.bench-0.svc:6379"}
  allowedCIDRs: ["10.0.0.0/8"]
  tls: {mode: disabled}
EOF
POD_NAMESPACE=dbportal-system POD_NAME=ceiling DBPORTAL_METRICS_ADDRESS=127.0.0.1:0 RUST_LOG=warn \
    "$operator" >"$work/operator.log" 2>&1 &
operator_pid=$!
children=(cm/tmpl-portal sts/tmpl-portal svc/tmpl-portal svc/tmpl-portal-0 svc/tmpl-portal-1
    sa/tmpl-portal role/tmpl-portal rolebinding/tmpl-portal pdb/tmpl-portal)
for _ in $(seq 1 60); do
    "$kubectl" get -n bench-0 "${children[@]}" >/dev/null 2>&1 && break
    sleep 0.5
done
for _ in $(seq 1 60); do
    [[ $("$kubectl" get -n bench-0 dbp/tmpl -o 'jsonpath={.status.observedGeneration}') == 1 ]] && break
    sleep 0.5
done
"$kubectl" get -n bench-0 "${children[@]}" dbp/tmpl -o json >"$work/children.json"
kill "$operator_pid"
wait "$operator_pid" 2>/dev/null || true
operator_pid=

for c in "${concurrencies[@]}"; do
    start_plane
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    busy_before=$(busy_cpu_seconds)
    started=$(date +%s.%N)
    python3 bench/apiserver_ceiling.py "${floor[@]}" "$KUBECONFIG" "$work/children.json" "$n" "$c" "${namespaces[@]}"
    echo "machine CPU busy: $(awk "BEGIN {printf \"%.1f of %.1f CPU-s\", $(busy_cpu_seconds) - $busy_before, ($(date +%s.%N) - $started) * $(nproc)}") (everything running)"
    echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)"
done
