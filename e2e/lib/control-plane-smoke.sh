#!/usr/bin/env bash
# Smoke test for e2e/local-control-plane.sh: starts a control plane in a
# temporary directory and checks the API features dbportal's operator relies
# on (CRDs with status subresource, garbage collection, StatefulSet
# controller, server-side apply, RBAC for the operator identity).
#
#   e2e/lib/control-plane-smoke.sh        (run `local-control-plane.sh build` first)
set -euo pipefail

LCP=$(cd "$(dirname "$0")/.." && pwd)/local-control-plane.sh
BIN_DIR=$("$LCP" bin-dir)
DIR=$(mktemp -d -t dbportal-lcp-smoke.XXXXXX)
cleanup() {
    "$LCP" stop "$DIR/second" || true
    "$LCP" stop "$DIR" || true
    if [[ ${KEEP_DIR:-0} == 1 ]]; then
        echo "state kept in $DIR" >&2
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# retry SECONDS CMD...: run CMD until it succeeds or SECONDS pass.
retry() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 0.5
    done
}

# The CRD is handed to `start`, which applies it before the controller
# manager starts (so garbage collection knows the kind from the beginning).
cat >"$DIR/crd.yaml" <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.dbportal.io
spec:
  group: smoke.dbportal.io
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Phase
      type: string
      jsonPath: .status.phase
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size:
                type: integer
                minimum: 1
              note:
                type: string
                default: ""
              ports:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [name]
                items:
                  type: object
                  required: [name]
                  properties:
                    name:
                      type: string
                    port:
                      type: integer
          status:
            type: object
            properties:
              phase:
                type: string
              leader:
                type: string
                default: ""
YAML

step "start"
t0=$(date +%s%N)
# The project's own CRDs, when present, must install too.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
manifests=("$DIR/crd.yaml")
for f in "$REPO"/crds/*.yaml; do
    [[ -f $f ]] && manifests+=("$f")
done
KUBECONFIG=$("$LCP" start "$DIR" "${manifests[@]}" | tail -n1)
export KUBECONFIG
echo "start took $((($(date +%s%N) - t0) / 1000000)) ms; KUBECONFIG=$KUBECONFIG" >&2
eval "$("$LCP" env "$DIR")"
[[ $KUBECONFIG == "$DIR/admin.kubeconfig" ]] || fail "env printed an unexpected KUBECONFIG"

k() { "$BIN_DIR/kubectl" "$@"; }
kop() { "$BIN_DIR/kubectl" --kubeconfig "$DBPORTAL_OPERATOR_KUBECONFIG" "$@"; }

k version --short
k get --raw /readyz?verbose | tail -n1

step "namespace"
k create namespace smoke

step "CustomResourceDefinition (v1, structural schema, status subresource)"
k apply -f "$DIR/crd.yaml"
k wait --for=condition=Established --timeout=30s crd/widgets.smoke.dbportal.io

step "custom object"
k -n smoke apply -f - <<'YAML'
apiVersion: smoke.dbportal.io/v1alpha1
kind: Widget
metadata:
  name: w1
spec:
  size: 3
  note: ""
  ports:
  - {name: sql, port: 0}
YAML
if k -n smoke apply -f - 2>/dev/null <<'YAML'
apiVersion: smoke.dbportal.io/v1alpha1
kind: Widget
metadata:
  name: w-invalid
spec:
  size: 0
YAML
then fail "schema validation did not reject size: 0"; fi
# Defaulting, including an empty-string default.
k -n smoke create -f - <<'YAML'
apiVersion: smoke.dbportal.io/v1alpha1
kind: Widget
metadata:
  name: w2
spec:
  size: 1
YAML
k -n smoke get widget w2 -o json |
    python3 -c 'import json,sys; o=json.load(sys.stdin); assert o["spec"]["note"] == "", o["spec"]' ||
    fail "CRD default (empty string) not applied"
# Status goes through the /status subresource only.
base=/apis/smoke.dbportal.io/v1alpha1/namespaces/smoke/widgets/w1
k get --raw "$base" |
    python3 -c 'import json,sys; o=json.load(sys.stdin); o["status"]={"phase":"Ready","leader":""}; o["spec"]["size"]=9; print(json.dumps(o))' \
        >"$DIR/w1-status.json"
k replace --raw "$base/status" -f "$DIR/w1-status.json" >/dev/null
[[ $(k -n smoke get widget w1 -o 'jsonpath={.status.phase}/{.spec.size}') == Ready/3 ]] ||
    fail "status subresource did not behave (want status updated, spec unchanged)"
k -n smoke get widgets

step "server-side apply"
cat >"$DIR/ssa.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa
  namespace: smoke
data:
  a: "1"
YAML
k apply --server-side --field-manager=smoke -f "$DIR/ssa.yaml"
sed -i 's/a: "1"/a: "2"/' "$DIR/ssa.yaml"
k apply --server-side --field-manager=smoke -f "$DIR/ssa.yaml"
[[ $(k -n smoke get cm ssa -o 'jsonpath={.data.a}') == 2 ]] || fail "SSA update not applied"
k -n smoke get cm ssa -o 'jsonpath={.metadata.managedFields[*].operation}' | grep -q Apply ||
    fail "no Apply entry in managedFields"
# Conflict detection with a second manager.
sed 's/a: "2"/a: "3"/' "$DIR/ssa.yaml" >"$DIR/ssa-other.yaml"
if k apply --server-side --field-manager=other -f "$DIR/ssa-other.yaml" 2>"$DIR/conflict.err"; then
    fail "expected an SSA conflict"
fi
grep -qi conflict "$DIR/conflict.err" || fail "unexpected SSA error: $(cat "$DIR/conflict.err")"
# Server-side apply on the custom resource too.
k -n smoke apply --server-side --force-conflicts --field-manager=smoke -f - <<'YAML'
apiVersion: smoke.dbportal.io/v1alpha1
kind: Widget
metadata:
  name: w1
spec:
  size: 5
YAML
[[ $(k -n smoke get widget w1 -o 'jsonpath={.spec.size}') == 5 ]] || fail "SSA on CR failed"

step "garbage collection (ownerReference to the custom object)"
uid=$(k -n smoke get widget w1 -o 'jsonpath={.metadata.uid}')
k -n smoke apply -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: owned-by-w1
  ownerReferences:
  - apiVersion: smoke.dbportal.io/v1alpha1
    kind: Widget
    name: w1
    uid: $uid
    controller: true
    blockOwnerDeletion: true
data: {owner: w1}
YAML
k -n smoke delete widget w1 --wait=true
gone() { ! k -n smoke get cm owned-by-w1 >/dev/null 2>&1; }
t=$SECONDS
retry 30 gone || fail "owned ConfigMap was not garbage-collected"
echo "owned ConfigMap collected after ~$((SECONDS - t)) s" >&2

step "garbage collection (built-in owner)"
k -n smoke create configmap owner
uid=$(k -n smoke get cm owner -o 'jsonpath={.metadata.uid}')
k -n smoke apply -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: owned-by-cm
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: owner, uid: $uid}
YAML
k -n smoke delete cm owner
gone2() { ! k -n smoke get cm owned-by-cm >/dev/null 2>&1; }
t=$SECONDS
retry 30 gone2 || fail "owned ConfigMap was not garbage-collected"
echo "owned ConfigMap collected after ~$((SECONDS - t)) s" >&2

step "StatefulSet controller creates Pods"
k -n smoke apply -f - <<'YAML'
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  serviceName: db
  replicas: 2
  podManagementPolicy: Parallel
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        image: example.invalid/db:1
  volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: [ReadWriteOnce]
      resources:
        requests:
          storage: 1Gi
YAML
two_pods() { [[ $(k -n smoke get pods -l app=db -o name | wc -l) -eq 2 ]]; }
retry 30 two_pods || fail "StatefulSet pods were not created"
k -n smoke get pods,pvc

step "operator identity and RBAC"
if kop -n smoke get configmaps 2>"$DIR/forbidden.err"; then
    fail "operator identity could list configmaps without RBAC"
fi
grep -q Forbidden "$DIR/forbidden.err" || fail "expected Forbidden, got: $(cat "$DIR/forbidden.err")"
cat "$DIR/forbidden.err" >&2
k apply -f - <<'YAML'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: smoke-operator
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
- apiGroups: [smoke.dbportal.io]
  resources: [widgets, widgets/status]
  verbs: [get, list, watch, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: smoke-operator
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: smoke-operator
subjects:
- kind: ServiceAccount
  name: dbportal-operator
  namespace: dbportal-system
YAML
allowed() { kop -n smoke get configmaps >/dev/null 2>&1; }
retry 10 allowed || fail "operator identity still forbidden after ClusterRoleBinding"
kop -n smoke get configmaps
kop auth can-i --list -n smoke
if kop -n smoke delete cm ssa 2>/dev/null; then fail "operator could delete without RBAC"; fi

step "second control plane in parallel, stopped by its watchdog"
DIR2=$DIR/second
sleep 300 &
owner=$!
KUBECONFIG2=$(DBPORTAL_LCP_WATCH_PID=$owner "$LCP" start "$DIR2" | tail -n1)
k --kubeconfig "$KUBECONFIG2" get ns default -o name
k get ns smoke -o name
[[ $(k --kubeconfig "$KUBECONFIG2" get ns smoke -o name 2>/dev/null) == "" ]] ||
    fail "second control plane shares state with the first"
pids2=$(cat "$DIR2"/*.pid)
kill "$owner"
wait "$owner" 2>/dev/null || true
all_gone() {
    local p
    for p in $pids2; do
        [[ -e /proc/$p ]] && [[ $(awk '{print $3}' "/proc/$p/stat") != Z ]] && return 1
    done
    return 0
}
retry 20 all_gone || fail "watchdog did not stop the second control plane"
cat "$DIR2/watchdog.log" >&2
"$LCP" stop "$DIR2"

step "stop (twice)"
pids=$(cat "$DIR"/*.pid)
"$LCP" stop "$DIR"
"$LCP" stop "$DIR"
for p in $pids; do
    if [[ -e /proc/$p ]] && [[ $(awk '{print $3}' "/proc/$p/stat") != Z ]]; then
        fail "process $p still running after stop"
    fi
done
echo "ALL CHECKS PASSED" >&2
