#!/usr/bin/env bash
# Smoke test for e2e/local-node.sh: starts the single-node cluster, imports
# the images, runs the portal from its image in front of a redis-server on
# the host (config from a ConfigMap, readiness on /readyz), reaches it
# through a ClusterIP Service from the host and from a pod, calls the API
# server from a pod with its service-account token, reports timings and
# memory, stops everything and checks that nothing is left behind.
#
#   e2e/lib/node-smoke.sh [BUILD_IMAGES_ARGS...]   e.g. --no-cargo, --dynamic
#
# Run `e2e/local-control-plane.sh build --node` first. Needs root.
set -euo pipefail

E2E=$(cd "$(dirname "$0")/.." && pwd -P)
NODE=$E2E/local-node.sh
DIR=$(mktemp -d -t dbportal-node-smoke.XXXXXX)
REDIS_PID=

cleanup() {
    [[ -z $REDIS_PID ]] || kill "$REDIS_PID" 2>/dev/null || true
    "$NODE" stop "$DIR" || true
    if [[ ${KEEP_DIR:-0} == 1 ]]; then
        echo "state kept in $DIR" >&2
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }
since() { echo "$(( $(now_ms) - $1 )) ms"; }

retry() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 0.2
    done
}

step "start the node"
t=$(now_ms)
"$NODE" start "$DIR" >/dev/null
echo "start: $(since "$t")" >&2
eval "$("$NODE" env "$DIR")"
kc() { "$DBPORTAL_K8S_BIN_DIR/kubectl" --request-timeout=10s "$@"; }
kc get nodes -o wide >&2
[[ $(kc get node "$DBPORTAL_NODE_NAME" -o jsonpath='{.spec.taints}') == "" ]] ||
    fail "node still tainted"

step "build and import images"
t=$(now_ms)
"$E2E/build-images.sh" "$@" "$DIR"
echo "images: $(since "$t")" >&2

step "redis-server on the bridge address"
redis-server --bind "$DBPORTAL_NODE_IP" --port 6379 --save '' --appendonly no \
    --protected-mode no --dir "$DIR" </dev/null >"$DIR/redis.log" 2>&1 &
REDIS_PID=$!
retry 10 redis-cli -h "$DBPORTAL_NODE_IP" -p 6379 ping || fail "redis-server did not start"

step "portal pod from dbportal/portal:dev behind a ClusterIP Service"
t=$(now_ms)
kc apply -f - >&2 <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: portal-config}
data:
  portal.yaml: |
    engine: redis
    backends:
      - {name: host, address: "$DBPORTAL_NODE_IP:6379"}
    routing: {mode: first}
    tls: {mode: disabled}
    listen: "0.0.0.0:6380"
    admin: "0.0.0.0:8404"
    drainTimeout: 5s
---
apiVersion: v1
kind: Pod
metadata:
  name: portal
  labels: {app: portal}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
  containers:
  - name: portal
    image: dbportal/portal:dev
    imagePullPolicy: Never
    args: [--config, /etc/portal/portal.yaml]
    ports:
    - {name: redis, containerPort: 6380}
    - {name: admin, containerPort: 8404}
    readinessProbe:
      httpGet: {path: /readyz, port: admin}
      periodSeconds: 1
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {drop: [ALL]}
    volumeMounts:
    - {name: config, mountPath: /etc/portal}
  volumes:
  - name: config
    configMap: {name: portal-config}
---
apiVersion: v1
kind: Service
metadata: {name: portal}
spec:
  selector: {app: portal}
  ports:
  - {name: redis, port: 6380, targetPort: redis}
EOF
kc wait --for=condition=Ready pod/portal --timeout=60s >&2 || {
    kc describe pod portal >&2
    fail "portal pod not Ready"
}
echo "portal pod Ready: $(since "$t")" >&2
kc get pod portal -o wide >&2
cluster_ip=$(kc get service portal -o jsonpath='{.spec.clusterIP}')
retry 10 redis-cli -h "$cluster_ip" -p 6380 ping || fail "no answer through $cluster_ip:6380"
redis-cli -h "$cluster_ip" -p 6380 set smoke ok >/dev/null
[[ $(redis-cli -h "$DBPORTAL_NODE_IP" -p 6379 get smoke) == ok ]] ||
    fail "write through the Service did not reach redis-server"
echo "host -> ClusterIP $cluster_ip:6380 -> portal -> redis-server: ok" >&2

step "pod -> Service -> portal, and pod -> API server with its token"
kc create role pod-reader --verb=get,list --resource=pods >&2
kc create rolebinding default-pod-reader --role=pod-reader \
    --serviceaccount=default:default >&2
kc apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  containers:
  - name: client
    image: dbportal/toolbox:dev
    imagePullPolicy: Never
    command: [/bin/busybox, sh, -ec]
    args:
    - |
      sa=/var/run/secrets/kubernetes.io/serviceaccount
      echo "redis via Service: \$(/usr/bin/redis-cli -h $cluster_ip -p 6380 get smoke)"
      /usr/bin/curl -sS --fail --max-time 10 --cacert \$sa/ca.crt \\
        -H "Authorization: Bearer \$(/bin/busybox cat \$sa/token)" \\
        "https://\$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/pods/portal" \\
        -o /tmp/pod.json
      echo "API: portal pod phase \$(/bin/busybox grep -o '"phase": *"[A-Za-z]*"' /tmp/pod.json)"
EOF
retry 60 bash -c "[[ \$('$DBPORTAL_K8S_BIN_DIR/kubectl' get pod client -o jsonpath='{.status.phase}') =~ Succeeded|Failed ]]" ||
    fail "client pod did not finish"
kc logs client >&2
[[ $(kc get pod client -o jsonpath='{.status.phase}') == Succeeded ]] || fail "client pod failed"
kc logs client | grep -q 'redis via Service: ok' || fail "pod could not reach the Service"
kc logs client | grep -q '"phase": *"Running"' || fail "pod could not read from the API"

if ctr --address "$DBPORTAL_CONTAINERD_ADDRESS" -n k8s.io images ls -q |
    grep -x docker.io/dbportal/operator:dev >/dev/null; then
    step "the operator image starts"
    kc run operator-help --image=dbportal/operator:dev --image-pull-policy=Never \
        --restart=Never -- --help >&2
    retry 60 bash -c "[[ \$('$DBPORTAL_K8S_BIN_DIR/kubectl' get pod operator-help -o jsonpath='{.status.phase}') =~ Succeeded|Failed ]]" ||
        fail "operator pod did not finish"
    kc logs operator-help >"$DIR/operator-help.log"
    head -n 3 "$DIR/operator-help.log" >&2
    [[ $(kc get pod operator-help -o jsonpath='{.status.phase}') == Succeeded ]] ||
        fail "operator --help failed"
fi

step "memory (RSS)"
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
total=0
for f in "$DIR"/*.pid; do
    pid=$(<"$f")
    rss=$(rss_kb "$pid")
    printf '%-24s %6d MB\n' "$(basename "$f" .pid)" $((rss / 1024)) >&2
    total=$((total + rss))
done
# Containers (init PIDs recorded by containerd) and their shims (parents).
containers=0 shims=() shim_rss=0
for f in "$DIR"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*/init.pid; do
    [[ -f $f ]] || continue
    pid=$(<"$f")
    containers=$((containers + $(rss_kb "$pid")))
    shim=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    [[ -z $shim || " ${shims[*]} " == *" $shim "* ]] || shims+=("$shim")
done
for shim in "${shims[@]}"; do shim_rss=$((shim_rss + $(rss_kb "$shim"))); done
printf '%-24s %6d MB\n' "shims (${#shims[@]})" $((shim_rss / 1024)) "containers" $((containers / 1024)) >&2
total=$((total + shim_rss + containers))
printf '%-24s %6d MB\n' total $((total / 1024)) >&2

step "stop and check that nothing is left"
t=$(now_ms)
"$NODE" stop "$DIR"
echo "stop: $(since "$t")" >&2
! ip link show "$DBPORTAL_NODE_BRIDGE" >/dev/null 2>&1 || fail "bridge left behind"
! iptables-save | grep -q KUBE- || fail "iptables rules left behind"
! grep -qF "$DIR/" /proc/self/mountinfo || fail "mounts left behind"
echo "OK" >&2
