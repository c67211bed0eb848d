#!/usr/bin/env bash
# dbportal's end-to-end suite: runs against whatever KUBECONFIG points to
# (the local node through e2e/local.sh, kind through e2e/kind.sh) with the
# operator already installed, and checks what a user would see:
#
#   1 apply      a Redis DatabasePortal (primary + replica): children, both
#                portal pods Ready, clients through each per-portal Service,
#                status.leader, `kubectl get dbp` 2/2
#   2 allowlist  narrow allowedCIDRs: the removed client is refused and its
#                open sessions are cut; the kept one is served; no restart
#   3 promote    promote the replica: both portals follow, status.leader
#                changes, a LeaderChanged Event
#   4 tls        rotate the TLS Secret: new handshakes get the new
#                certificate, open sessions survive
#   5 configmap  break the ConfigMap by hand: the portals keep serving, the
#                operator restores it
#   6 pod        delete one portal pod: the other serves throughout, the pod
#                returns
#   7 delete     delete the DatabasePortal: its children are collected
#   8 minimal    a DatabasePortal without tls: the operator's own CA signs
#                the portals' certificate; clients verify it with the
#                Secret's ca.crt (curl: chain and name; redis-cli --cacert)
#   9 operations the admin token Secret, drain through a portal and the spec
#  10 reads      a DatabasePortal with readOnly: the Service <name>-portal-ro
#                and the port on the per-portal Services; a client reaches
#                the replica through it (a write is refused: READONLY);
#                status.readOnly names the replica
#
# Each scenario prints PASS, FAIL (with diagnostics) or SKIP and what it saw;
# the last line is "e2e result: N passed, N failed, N skipped"; the exit
# status is 1 if any scenario failed.
#
# Environment:
#   KUBECONFIG                       the cluster
#   DBPORTAL_E2E_PLATFORM            local | kind (default: local when
#                                    DBPORTAL_NODE_IP is set, else kind)
#   DBPORTAL_E2E_DB                  host: redis-server processes on this
#                                    machine bound to DBPORTAL_NODE_IP (local
#                                    default); pod: redis pods from
#                                    DBPORTAL_E2E_DB_IMAGE (kind default)
#   DBPORTAL_E2E_TOOLBOX_IMAGE       client pods: busybox, redis-cli, curl
#                                    (default dbportal/toolbox:dev)
#   DBPORTAL_E2E_DB_IMAGE            image with redis-server for DB=pod
#                                    (default: the toolbox image)
#   DBPORTAL_E2E_OPERATOR            in-cluster | external (diagnostics only)
#   DBPORTAL_E2E_OPERATOR_NAMESPACE  the operator's namespace (dbportal-system)
#   DBPORTAL_E2E_STATE_DIR           where host redis PIDs are recorded, so
#                                    that a later run can clean up after a
#                                    killed one (e2e/local.sh sets it)
#   DBPORTAL_E2E_ONLY                e.g. "1 2 3": run only these scenarios
#                                    (the others are skipped)
#   DBPORTAL_K8S_BIN_DIR             kubectl is taken from here when set
#   KEEP_NAMESPACE=1                 leave the test namespace behind
# Checks pass code to eval and wait_until in single quotes on purpose.
# shellcheck disable=SC2016,SC2015,SC2317
set -euo pipefail

readonly DP=cache
PLATFORM=${DBPORTAL_E2E_PLATFORM:-$([[ -n ${DBPORTAL_NODE_IP:-} ]] && echo local || echo kind)}
DB_MODE=${DBPORTAL_E2E_DB:-$([[ $PLATFORM == local ]] && echo host || echo pod)}
TOOLBOX_IMAGE=${DBPORTAL_E2E_TOOLBOX_IMAGE:-dbportal/toolbox:dev}
DB_IMAGE=${DBPORTAL_E2E_DB_IMAGE:-$TOOLBOX_IMAGE}
OPERATOR_NS=${DBPORTAL_E2E_OPERATOR_NAMESPACE:-dbportal-system}
KUBECTL=kubectl
[[ -z ${DBPORTAL_K8S_BIN_DIR:-} ]] || KUBECTL=$DBPORTAL_K8S_BIN_DIR/kubectl
NS=dbportal-e2e-$(date +%s)-$RANDOM
WORK=$(mktemp -d -t dbportal-e2e-suite.XXXXXX)
readonly PLATFORM DB_MODE TOOLBOX_IMAGE DB_IMAGE OPERATOR_NS KUBECTL NS WORK
REDIS_PIDS=()
PASSED=0 FAILED=0 SKIPPED=0

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }
kc() { "$KUBECTL" --request-timeout=20s "$@"; }
kn() { kc -n "$NS" "$@"; }

# --- scenarios: bookkeeping --------------------------------------------------

CUR="" CUR_BAD=() CUR_SAW=()
begin() {
    CUR=$1 CUR_BAD=() CUR_SAW=()
    log "== scenario $CUR"
}
saw() { CUR_SAW+=("$*"); log "  saw: $*"; }
bad() { CUR_BAD+=("$*"); log "  FAILED: $*"; }
# check DESCRIPTION COMMAND...: run COMMAND; a failure becomes a failed check.
check() {
    local what=$1
    shift
    if "$@"; then saw "$what"; else bad "$what"; fi
}
end() {
    local line
    if [[ ${#CUR_BAD[@]} -eq 0 ]]; then
        PASSED=$((PASSED + 1))
        echo "PASS: $CUR"
        for line in "${CUR_SAW[@]}"; do echo "    $line"; done
        return 0
    fi
    FAILED=$((FAILED + 1))
    echo "FAIL: $CUR"
    for line in "${CUR_BAD[@]}"; do echo "    failed: $line"; done
    for line in "${CUR_SAW[@]}"; do echo "    saw: $line"; done
    diagnostics >&2
    return 1
}
skip() {
    SKIPPED=$((SKIPPED + 1))
    echo "SKIP: $1 ($2)"
}
wanted() { [[ -z ${DBPORTAL_E2E_ONLY:-} || " $DBPORTAL_E2E_ONLY " == *" $1 "* ]]; }

# wait_until SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_until() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@" >/dev/null 2>&1; do
        [[ $(now_ms) -lt $deadline ]] || return 1
        sleep 0.2
    done
}

diagnostics() {
    echo "---- diagnostics ($CUR) ----"
    kn get dbp,statefulset,pods,services,configmaps,events -o wide 2>&1 | tail -n 80
    kn get dbp "$DP" -o yaml 2>&1 | sed -n '/^status:/,$p'
    kn describe pods -l "app.kubernetes.io/instance=$DP" 2>&1 | tail -n 60
    local pod
    for pod in $(kn get pods -l "app.kubernetes.io/instance=$DP" -o name 2>/dev/null); do
        echo "-- logs $pod"
        kn logs "$pod" --tail=40 2>&1
    done
    echo "-- operator logs ($OPERATOR_NS)"
    kc -n "$OPERATOR_NS" logs -l app.kubernetes.io/name=dbportal,app.kubernetes.io/component=operator --tail=60 2>&1 ||
        true
    if [[ $DB_MODE == host ]]; then
        local f
        for f in "$WORK"/redis-*.log; do
            [[ -f $f ]] || continue
            echo "-- $f"
            tail -n 10 "$f"
        done
    fi
    echo "---- end of diagnostics ----"
}

cleanup() {
    local rc=$?
    set +e
    if [[ ${KEEP_NAMESPACE:-0} == 1 ]]; then
        log "keeping namespace $NS"
    else
        kc delete namespace "$NS" --wait=false >/dev/null 2>&1
    fi
    local pid
    for pid in "${REDIS_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${REDIS_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    if [[ -n ${DBPORTAL_E2E_STATE_DIR:-} ]]; then
        rm -f "$DBPORTAL_E2E_STATE_DIR/e2e-redis.pids"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- clients -------------------------------------------------------------------

# Client pods run these helpers (mounted from a ConfigMap), so that the same
# commands work on any cluster: the host may not reach Service addresses.
client_script() {
    cat <<'EOF'
# Helpers of the e2e suite's client pods (busybox sh).
set -u
cmd=$1
shift
case $cmd in
  portal) # HOST PORT ARGS...: redis-cli through a portal (TLS, certificate not checked)
    h=$1 p=$2; shift 2
    exec timeout 5 redis-cli --tls --insecure -h "$h" -p "$p" "$@" ;;
  plain) # HOST PORT ARGS...: redis-cli through a portal without TLS
    h=$1 p=$2; shift 2
    exec timeout 5 redis-cli -h "$h" -p "$p" "$@" ;;
  db) # HOST PORT ARGS...: redis-cli straight to a database
    h=$1 p=$2; shift 2
    exec timeout 5 redis-cli -h "$h" -p "$p" "$@" ;;
  open) # ID HOST PORT: an open session blocked in BLPOP e2e:ID, in the background
    id=$1 h=$2 p=$3
    rm -f "/tmp/$id.rc" "/tmp/$id.out"
    sh -c "redis-cli --tls --insecure -h $h -p $p BLPOP e2e:$id 0 >/tmp/$id.out 2>&1; echo \$? >/tmp/$id.rc" \
      </dev/null >/dev/null 2>&1 &
    echo started ;;
  state) # ID: "open", or "closed rc=N output"
    id=$1
    if [ -f "/tmp/$id.rc" ]; then
      echo "closed rc=$(cat "/tmp/$id.rc") $(tr '\n' ' ' <"/tmp/$id.out")"
    else
      echo open
    fi ;;
  cert) # HOST PORT: subject of the certificate the portal presents
    curl -vsk --max-time 5 "https://$1:$2/" -o /dev/null 2>&1 | grep -o 'subject: .*' | head -n 1 ;;
  loop) # ID HOST PORT: PING through a portal every 100 ms until /tmp/ID.stop (at most 3000)
    id=$1 h=$2 p=$3
    rm -f "/tmp/$id.stop" "/tmp/$id.done" "/tmp/$id.bad"
    (
      ok=0 failed=0 n=0
      while [ ! -f "/tmp/$id.stop" ] && [ $n -lt 3000 ]; do
        if timeout 5 redis-cli --tls --insecure -h "$h" -p "$p" PING 2>&1 | grep -q PONG; then
          ok=$((ok + 1))
        else
          failed=$((failed + 1))
          date +%T >>"/tmp/$id.bad"
        fi
        n=$((n + 1))
        echo "$ok $failed" >"/tmp/$id.count"
        usleep 100000
      done
      echo done >"/tmp/$id.done"
    ) </dev/null >/dev/null 2>&1 &
    echo started ;;
  loop-stop) # ID: stop the loop, print "OK FAILED"
    id=$1
    touch "/tmp/$id.stop"
    n=0
    while [ ! -f "/tmp/$id.done" ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
    cat "/tmp/$id.count" ;;
  http) # URL
    exec curl -sS --max-time 5 "$1" ;;
  post) # TOKEN URL BODY [METHOD]: an admin request (no token when ""); prints "STATUS BODY"
    t=$1 u=$2 b=$3 m=${4:-POST}
    if [ -n "$t" ]; then a="Authorization: Bearer $t"; else a="X-Without-Token: 1"; fi
    out=$(curl -sS --max-time 5 -X "$m" -H "$a" -H 'Content-Type: application/json' \
      -d "$b" -w '\n%{http_code}' "$u")
    echo "$(echo "$out" | tail -n 1) $(echo "$out" | sed '$d' | tr '\n' ' ')" ;;
  put) # FILE: stdin into FILE
    cat >"$1" ;;
  verify) # CAFILE NAME PORT IP: TLS to IP as NAME, verified against CAFILE (chain and name)
    curl -v --max-time 5 --cacert "$1" --resolve "$2:$3:$4" "https://$2:$3/" -o /dev/null 2>&1 |
      grep -E 'SSL certificate (verify|problem)|subject:' ;;
  verified) # CAFILE SNI IP PORT ARGS...: redis-cli through a portal, its chain verified
    ca=$1 sni=$2 h=$3 p=$4; shift 4
    exec timeout 5 redis-cli --tls --cacert "$ca" --sni "$sni" -h "$h" -p "$p" "$@" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
EOF
}

# cx POD ARGS...: run the client helper in POD.
cx() {
    local pod=$1
    shift
    timeout 30 "$KUBECTL" --request-timeout=25s -n "$NS" exec "$pod" -- \
        busybox sh /e2e/c.sh "$@"
}

# cxi POD ARGS...: the same with this script's stdin.
cxi() {
    local pod=$1
    shift
    timeout 30 "$KUBECTL" --request-timeout=25s -n "$NS" exec -i "$pod" -- \
        busybox sh /e2e/c.sh "$@"
}

# Commands for the databases go through client-a too (same path on every platform).
db() { cx client-a db "$@"; }
# through PORTAL_ADDR CLIENT ARGS...
through() {
    local addr=$1 client=$2
    shift 2
    cx "$client" portal "$addr" "$PORT" "$@"
}

client_pod() {
    cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels: {app: dbportal-e2e-client}
spec:
  terminationGracePeriodSeconds: 1
  enableServiceLinks: false
  containers:
  - name: client
    image: $TOOLBOX_IMAGE
    imagePullPolicy: IfNotPresent
    command: [/bin/busybox, sh, -c, "busybox sleep 3600"]
    env:
    - {name: PATH, value: /usr/local/bin:/usr/bin:/bin}
    volumeMounts:
    - {name: e2e, mountPath: /e2e}
  volumes:
  - name: e2e
    configMap: {name: e2e-client}
EOF
}

# --- databases -------------------------------------------------------------------

free_port() {
    python3 -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"
}

start_host_redis() {
    local name=$1 port=$2
    shift 2
    mkdir -p "$WORK/$name"
    redis-server --bind "$DBPORTAL_NODE_IP" --port "$port" --save '' --appendonly no \
        --protected-mode no --dir "$WORK/$name" "$@" </dev/null >"$WORK/redis-$name.log" 2>&1 &
    REDIS_PIDS+=("$!")
    if [[ -n ${DBPORTAL_E2E_STATE_DIR:-} ]]; then
        echo "$!" >>"$DBPORTAL_E2E_STATE_DIR/e2e-redis.pids"
    fi
}

redis_pod() {
    local name=$1
    shift
    cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels: {app: dbportal-e2e-redis}
spec:
  terminationGracePeriodSeconds: 1
  enableServiceLinks: false
  containers:
  - name: redis
    image: $DB_IMAGE
    imagePullPolicy: IfNotPresent
    command: [redis-server, --port, "6379", --save, "", --appendonly, "no", --protected-mode, "no"$([[ $# -eq 0 ]] || printf ', "%s"' "$@")]
    env:
    - {name: PATH, value: /usr/local/bin:/usr/bin:/bin}
    readinessProbe:
      tcpSocket: {port: 6379}
      periodSeconds: 1
EOF
}

pod_ip() { kn get pod "$1" -o jsonpath='{.status.podIP}'; }
pod_ready() {
    [[ $(kn get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
pods_ready() {
    local p
    for p in "$@"; do pod_ready "$p" || return 1; done
}

# Starts the primary and the replica; sets A_HOST A_PORT B_HOST B_PORT.
start_databases() {
    if [[ $DB_MODE == host ]]; then
        A_HOST=$DBPORTAL_NODE_IP B_HOST=$DBPORTAL_NODE_IP
        A_PORT=$(free_port "$A_HOST")
        B_PORT=$(free_port "$B_HOST")
        [[ $A_PORT != "$B_PORT" ]] || B_PORT=$(free_port "$B_HOST")
        start_host_redis redis-a "$A_PORT"
        start_host_redis redis-b "$B_PORT" --replicaof "$A_HOST" "$A_PORT"
    else
        redis_pod redis-a | kn apply -f - >/dev/null
        wait_until 120 pods_ready redis-a || { log "redis-a not Ready"; return 1; }
        A_HOST=$(pod_ip redis-a) A_PORT=6379
        redis_pod redis-b --replicaof "$A_HOST" 6379 | kn apply -f - >/dev/null
        wait_until 120 pods_ready redis-b || { log "redis-b not Ready"; return 1; }
        B_HOST=$(pod_ip redis-b) B_PORT=6379
    fi
}

replication_up() {
    db "$B_HOST" "$B_PORT" INFO replication | grep -q 'master_link_status:up'
}

# --- the DatabasePortal ------------------------------------------------------------

readonly PORT=6379
# apply_dp ALLOWED_CIDRS_FLOW_LIST
apply_dp() {
    kn apply -f - <<EOF
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata:
  name: $DP
spec:
  engine: redis
  backends:
    - {name: redis-a, address: "$A_HOST:$A_PORT"}
    - {name: redis-b, address: "$B_HOST:$B_PORT"}
  routing: {mode: leader}
  allowedCIDRs: $1
  tls: {mode: terminate, secretName: $DP-tls}
  portal: {replicas: 2}
EOF
}

make_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$2" -addext "subjectAltName=DNS:$DP-portal.$NS.svc" \
        -keyout "$WORK/$1.key" -out "$WORK/$1.crt" 2>/dev/null
}

apply_tls_secret() {
    kn create secret tls "$DP-tls" --cert "$WORK/$1.crt" --key "$WORK/$1.key" \
        --dry-run=client -o yaml | kn apply -f - >/dev/null
}

svc_ip() { kn get service "$1" -o jsonpath='{.spec.clusterIP}'; }
dp_field() { kn get dbp "$DP" -o jsonpath="{$1}" 2>/dev/null; }
dp_field_is() { [[ $(dp_field "$1") == "$2" ]]; }

# pods_fingerprint: "name uid restarts" of both portal pods.
pods_fingerprint() {
    kn get pods -l "app.kubernetes.io/instance=$DP" \
        -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.uid} {.status.containerStatuses[0].restartCount}{"\n"}{end}' |
        sort
}

# portal_status POD: the portal's /status (JSON) read from client-a on POD_IP:8404.
portal_status() { cx client-a http "http://$(pod_ip "$1"):8404/status"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
portal_leader_is() { [[ $(portal_status "$1" | json 'd.get("leader")') == "$2" ]]; }

pong() { [[ $(through "$1" "$2" PING 2>&1) == PONG ]]; }
refused() { ! pong "$@"; }
blocked_clients_is() {
    [[ $(db "$1" "$2" INFO clients | tr -d '\r' | sed -n 's/^blocked_clients://p') == "$3" ]]
}
state_is() { [[ $(cx "$1" state "$2") == "$3"* ]]; }
# run_id HOST PORT: the run_id of the redis-server there; one started on the node is asked from
# the node itself (its address is this host's), one in a pod from client-a.
run_id() {
    if [[ $DB_MODE == host ]]; then
        timeout 5 redis-cli -h "$1" -p "$2" INFO server 2>/dev/null
    else
        db "$1" "$2" INFO server
    fi | tr -d '\r' | sed -n 's/^run_id://p'
}

ALL_CHILDREN=("configmap/$DP-portal" "statefulset/$DP-portal" "service/$DP-portal"
    "service/$DP-portal-0" "service/$DP-portal-1" "serviceaccount/$DP-portal" "role/$DP-portal"
    "rolebinding/$DP-portal" "poddisruptionbudget/$DP-portal")

children_exist() { kn get "${ALL_CHILDREN[@]}" -o name >/dev/null 2>&1; }

# Prints one line per child that lacks a contract label or the owner reference.
children_contract_errors() {
    local uid
    uid=$(dp_field .metadata.uid)
    kn get "${ALL_CHILDREN[@]}" -o json | python3 -c '
import json, sys
uid, dp = sys.argv[1], sys.argv[2]
want = {"app.kubernetes.io/name": "dbportal", "app.kubernetes.io/instance": dp,
        "app.kubernetes.io/component": "portal", "app.kubernetes.io/managed-by": "dbportal-operator"}
for o in json.load(sys.stdin)["items"]:
    m = o["metadata"]
    what = o["kind"] + "/" + m["name"]
    labels = m.get("labels") or {}
    for k, v in want.items():
        if labels.get(k) != v:
            print(f"{what}: label {k}={labels.get(k)!r}, want {v!r}")
    refs = [r for r in m.get("ownerReferences") or [] if r.get("uid") == uid]
    if not refs or refs[0].get("kind") != "DatabasePortal" or not refs[0].get("controller"):
        print(f"{what}: no controller owner reference to DatabasePortal {dp}")
' "$uid" "$DP"
}

no_children_left() {
    [[ -z $(kn get "${ALL_CHILDREN[@]}" -o name --ignore-not-found 2>/dev/null) ]] &&
        [[ -z $(kn get pods -l "app.kubernetes.io/instance=$DP" -o name 2>/dev/null) ]]
}

leader_changed_events() {
    kn get events --field-selector "involvedObject.name=$DP,reason=LeaderChanged" -o json |
        python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
print(sum(max(e.get("count") or 1, 1) for e in items), " | ".join(e.get("message") or "" for e in items))'
}

# --- scenarios -------------------------------------------------------------------------

PREREQ="" APPLIED=""

scenario_apply() {
    begin "1 apply: a Redis DatabasePortal (primary + replica)"
    local t0
    t0=$(now_ms)
    apply_dp "[\"$CLIENT_A_IP/32\", \"$CLIENT_B_IP/32\"]" >/dev/null
    APPLIED=1
    if wait_until 60 children_exist; then
        saw "children exist after $(($(now_ms) - t0)) ms: ${ALL_CHILDREN[*]}"
        local errors
        errors=$(children_contract_errors)
        if [[ -z $errors ]]; then
            saw "every child has the four contract labels and a controller owner reference"
        else
            while IFS= read -r line; do bad "$line"; done <<<"$errors"
        fi
        local cm
        cm=$(kn get configmap "$DP-portal" -o jsonpath='{.data.portal\.yaml}')
        if grep -q "$A_HOST:$A_PORT" <<<"$cm"; then
            saw "ConfigMap $DP-portal key portal.yaml names the backends"
        else
            bad "ConfigMap $DP-portal key portal.yaml lacks redis-a: $cm"
        fi
    else
        bad "children missing after 60 s: $(kn get "${ALL_CHILDREN[@]}" -o name 2>&1 | tr '\n' ' ')"
    fi
    if wait_until 120 pods_ready "$DP-portal-0" "$DP-portal-1"; then
        saw "pods $DP-portal-0 and $DP-portal-1 Running and Ready after $(($(now_ms) - t0)) ms"
        PREREQ=ok
    else
        bad "portal pods not Ready within 120 s: $(kn get pods -o wide 2>&1 | tr '\n' ' ')"
        end
        return
    fi
    P0=$(svc_ip "$DP-portal-0") P1=$(svc_ip "$DP-portal-1") PALL=$(svc_ip "$DP-portal")
    local i addr out
    for i in 0 1; do
        addr=$([[ $i == 0 ]] && echo "$P0" || echo "$P1")
        if wait_until 30 pong "$addr" client-a; then
            out=$(through "$addr" client-a SET "e2e:s1:$i" "via-portal-$i" 2>&1)
            if [[ $out == OK && $(db "$A_HOST" "$A_PORT" GET "e2e:s1:$i") == "via-portal-$i" ]]; then
                saw "SET through Service $DP-portal-$i ($addr:$PORT, TLS) landed in the primary"
            else
                bad "SET through Service $DP-portal-$i ($addr:$PORT): $out; primary has $(db "$A_HOST" "$A_PORT" GET "e2e:s1:$i")"
            fi
        else
            bad "no PONG through Service $DP-portal-$i ($addr:$PORT): $(through "$addr" client-a PING 2>&1)"
        fi
        check "client-b ($CLIENT_B_IP) is served through $DP-portal-$i too" pong "$addr" client-b
    done
    check "Service $DP-portal (both portals) answers PING" wait_until 30 pong "$PALL" client-a
    if wait_until 60 dp_field_is .status.leader redis-a; then
        saw "status.leader = redis-a"
    else
        bad "status.leader = '$(dp_field .status.leader)' after 60 s, want redis-a"
    fi
    check "status.readyPortals = 2" wait_until 60 dp_field_is .status.readyPortals 2
    local row
    if wait_until 60 bash -c "'$KUBECTL' --request-timeout=20s -n '$NS' get dbp '$DP' --no-headers | grep -qw 2/2"; then
        row=$(kn get dbp "$DP" --no-headers)
        saw "kubectl get dbp: $(tr -s ' ' <<<"$row")"
        [[ $row == *redis-a* ]] || bad "kubectl get dbp shows no leader redis-a: $row"
    else
        bad "kubectl get dbp does not show 2/2: $(kn get dbp "$DP" --no-headers 2>&1)"
    fi
    end
}

scenario_allowlist() {
    begin "2 allowlist: narrow allowedCIDRs"
    local before after t0 took
    check "client-b reaches both portals before the change" \
        eval 'pong "$P0" client-b && pong "$P1" client-b'
    cx client-b open s2-b0 "$P0" "$PORT" >/dev/null
    cx client-b open s2-b1 "$P1" "$PORT" >/dev/null
    cx client-a open s2-a0 "$P0" "$PORT" >/dev/null
    check "3 sessions open and blocked in BLPOP on the primary (client-b on each portal, client-a on portal 0)" \
        wait_until 15 blocked_clients_is "$A_HOST" "$A_PORT" 3
    before=$(pods_fingerprint)
    t0=$(now_ms)
    apply_dp "[\"$CLIENT_A_IP/32\"]" >/dev/null
    if wait_until 15 eval 'refused "$P0" client-b && refused "$P1" client-b'; then
        took=$(($(now_ms) - t0))
        saw "client-b ($CLIENT_B_IP, removed) refused by both portals ${took} ms after kubectl apply (polled through kubectl exec; target 1 s: bench/propagation.sh measures it)"
        saw "client-b's PING now gets: $(through "$P0" client-b PING 2>&1 | tr '\n' ' ')"
    else
        bad "client-b still served 15 s after the change: $(through "$P0" client-b PING 2>&1) / $(through "$P1" client-b PING 2>&1)"
    fi
    if wait_until 10 eval 'state_is client-b s2-b0 closed && state_is client-b s2-b1 closed'; then
        saw "client-b's open sessions were cut: $(cx client-b state s2-b0) / $(cx client-b state s2-b1)"
    else
        bad "client-b's open sessions not cut: $(cx client-b state s2-b0) / $(cx client-b state s2-b1)"
    fi
    check "client-a ($CLIENT_A_IP, kept) still served by both portals" \
        eval 'pong "$P0" client-a && pong "$P1" client-a'
    check "client-a's open session is still open" state_is client-a s2-a0 open
    db "$A_HOST" "$A_PORT" LPUSH e2e:s2-a0 still-here >/dev/null
    if wait_until 10 state_is client-a s2-a0 "closed rc=0"; then
        local out
        out=$(cx client-a state s2-a0)
        [[ $out == *still-here* ]] && saw "client-a's session received still-here" ||
            bad "client-a's session ended without the value: $out"
    else
        bad "client-a's session did not receive the pushed value: $(cx client-a state s2-a0)"
    fi
    after=$(pods_fingerprint)
    [[ $before == "$after" ]] && saw "no portal pod restarted or replaced" ||
        bad "portal pods changed: before [$before] after [$after]"
    end
}

scenario_promote() {
    begin "3 promote: the replica becomes the primary"
    local n0 t0 before
    before=$(pods_fingerprint)
    read -r n0 _ <<<"$(leader_changed_events)"
    check "replica in sync before the promotion" wait_until 15 replication_up
    t0=$(now_ms)
    db "$B_HOST" "$B_PORT" REPLICAOF NO ONE >/dev/null
    db "$A_HOST" "$A_PORT" REPLICAOF "$B_HOST" "$B_PORT" >/dev/null
    local pod
    for pod in "$DP-portal-0" "$DP-portal-1"; do
        if wait_until 30 portal_leader_is "$pod" redis-b; then
            saw "$pod /status: leader redis-b ($(($(now_ms) - t0)) ms after the promotion)"
        else
            bad "$pod /status leader: $(portal_status "$pod" | json 'd.get("leader")')"
        fi
    done
    local want got addr
    want=$(run_id "$B_HOST" "$B_PORT")
    for addr in "$P0" "$P1"; do
        got=$(through "$addr" client-a INFO server | tr -d '\r' | sed -n 's/^run_id://p')
        [[ -n $want && $got == "$want" ]] && saw "Service $addr reaches redis-b (run_id ${want:0:8})" ||
            bad "Service $addr reaches run_id '$got', redis-b is '$want'"
    done
    check "a write through the portals lands in the new primary" \
        eval '[[ $(through "$P1" client-a SET e2e:s3 promoted) == OK && $(db "$B_HOST" "$B_PORT" GET e2e:s3) == promoted ]]'
    if wait_until 60 dp_field_is .status.leader redis-b; then
        saw "status.leader = redis-b ($(($(now_ms) - t0)) ms after the promotion)"
    else
        bad "status.leader = '$(dp_field .status.leader)' 60 s after the promotion, want redis-b"
    fi
    local events
    if wait_until 30 eval '
        read -r n1 msgs <<<"$(leader_changed_events)"
        [[ $n1 -gt $n0 || $msgs == *redis-b* ]]'; then
        events=$(leader_changed_events)
        saw "Event LeaderChanged recorded (before: $n0, now: ${events%% *}): ${events#* }"
    else
        bad "no LeaderChanged Event for the promotion (events: $(leader_changed_events 2>&1))"
    fi
    [[ $before == "$(pods_fingerprint)" ]] && saw "no portal pod restarted" ||
        bad "portal pods changed: [$before] -> [$(pods_fingerprint)]"
    end
}

scenario_tls() {
    begin "4 tls: rotate the TLS Secret"
    local before t0 addr i
    before=$(pods_fingerprint)
    for addr in "$P0" "$P1"; do
        check "portal $addr presents cert-1" \
            eval '[[ $(cx client-a cert "$addr" "$PORT") == *dbportal-e2e-cert-1* ]]'
    done
    cx client-a open s4-0 "$P0" "$PORT" >/dev/null
    cx client-a open s4-1 "$P1" "$PORT" >/dev/null
    check "2 TLS sessions open and blocked on the primary (one per portal)" \
        wait_until 15 blocked_clients_is "$B_HOST" "$B_PORT" 2
    t0=$(now_ms)
    apply_tls_secret cert-2
    i=0
    for addr in "$P0" "$P1"; do
        if wait_until 30 eval '[[ $(cx client-a cert "$addr" "$PORT") == *dbportal-e2e-cert-2* ]]'; then
            saw "new handshakes with $DP-portal-$i get cert-2 ($(($(now_ms) - t0)) ms after the Secret changed): $(cx client-a cert "$addr" "$PORT")"
        else
            bad "$DP-portal-$i still presents: $(cx client-a cert "$addr" "$PORT")"
        fi
        i=$((i + 1))
    done
    check "both sessions opened before the rotation are still open" \
        eval 'state_is client-a s4-0 open && state_is client-a s4-1 open'
    db "$B_HOST" "$B_PORT" LPUSH e2e:s4-0 after-rotation-0 >/dev/null
    db "$B_HOST" "$B_PORT" LPUSH e2e:s4-1 after-rotation-1 >/dev/null
    for i in 0 1; do
        if wait_until 10 state_is client-a "s4-$i" "closed rc=0"; then
            [[ $(cx client-a state "s4-$i") == *after-rotation-$i* ]] &&
                saw "session $i (old certificate) received after-rotation-$i" ||
                bad "session $i: $(cx client-a state "s4-$i")"
        else
            bad "session $i did not receive its value: $(cx client-a state "s4-$i")"
        fi
    done
    [[ $before == "$(pods_fingerprint)" ]] && saw "no portal pod restarted" ||
        bad "portal pods changed: [$before] -> [$(pods_fingerprint)]"
    end
}

scenario_configmap() {
    begin "5 configmap: break the ConfigMap by hand"
    local good t0 before ok=0 failed=0 pod
    before=$(pods_fingerprint)
    good=$(kn get configmap "$DP-portal" -o jsonpath='{.data.portal\.yaml}')
    declare -A failed0
    for pod in "$DP-portal-0" "$DP-portal-1"; do
        failed0[$pod]=$(portal_status "$pod" | json 'd["config"]["reload"]["reloadsFailed"]')
    done
    t0=$(now_ms)
    kn patch configmap "$DP-portal" --type merge \
        -p '{"data":{"portal.yaml":"engine: [redis\nbackends: {broken\n"}}' >/dev/null
    saw "patched $DP-portal with invalid YAML"
    # Serving while broken and while being restored.
    for _ in 1 2 3 4 5; do
        if pong "$P0" client-a && pong "$P1" client-a; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
    [[ $failed -eq 0 ]] && saw "both portals answered PING in $ok rounds after the break" ||
        bad "$failed of 5 rounds of PING through both portals failed after the break"
    cm_is_good() { [[ $(kn get configmap "$DP-portal" -o jsonpath='{.data.portal\.yaml}') == "$good" ]]; }
    if wait_until 30 cm_is_good; then
        saw "the operator restored the ConfigMap (checked after the PING rounds, $(($(now_ms) - t0)) ms after the break)"
    else
        bad "ConfigMap not restored within 30 s: $(kn get configmap "$DP-portal" -o jsonpath='{.data.portal\.yaml}')"
    fi
    portal_fresh() { [[ $(portal_status "$1" | json 'd["config"]["reload"]["stale"]') == False ]]; }
    for pod in "$DP-portal-0" "$DP-portal-1"; do
        local st
        wait_until 10 portal_fresh "$pod" || true
        st=$(portal_status "$pod" | json '"reloadsFailed=%s stale=%s lastError=%s" % (d["config"]["reload"]["reloadsFailed"], d["config"]["reload"]["stale"], (d["config"]["reload"]["lastError"] or "")[:120])')
        saw "$pod reload state: $st (reloadsFailed before: ${failed0[$pod]})"
        # The portal's watch delivers every version, so it saw the broken one and refused it.
        [[ $st =~ reloadsFailed=([0-9]+) && ${BASH_REMATCH[1]} -gt ${failed0[$pod]:-0} ]] ||
            bad "$pod did not refuse the broken configuration (reloadsFailed unchanged)"
        [[ $st == *"stale=False"* ]] || bad "$pod still serves a stale configuration after the restore"
    done
    check "both portals serve after the restore" eval 'pong "$P0" client-a && pong "$P1" client-a'
    [[ $before == "$(pods_fingerprint)" ]] && saw "no portal pod restarted" ||
        bad "portal pods changed: [$before] -> [$(pods_fingerprint)]"
    end
}

scenario_pod() {
    begin "6 pod: delete one portal pod"
    local uid t0 counts ok failed
    uid=$(kn get pod "$DP-portal-0" -o jsonpath='{.metadata.uid}')
    cx client-a loop s6 "$P1" "$PORT" >/dev/null
    sleep 1
    t0=$(now_ms)
    kn delete pod "$DP-portal-0" --wait=false >/dev/null
    saw "deleted pod $DP-portal-0 (uid ${uid:0:8})"
    new_pod_ready() {
        local u
        u=$(kn get pod "$DP-portal-0" -o jsonpath='{.metadata.uid}' 2>/dev/null)
        [[ -n $u && $u != "$uid" ]] && pod_ready "$DP-portal-0"
    }
    if wait_until 120 new_pod_ready; then
        saw "$DP-portal-0 returned (new pod) and is Ready after $(($(now_ms) - t0)) ms"
    else
        bad "$DP-portal-0 did not return Ready within 120 s: $(kn get pods -o wide 2>&1 | tr '\n' ' ')"
    fi
    check "Service $DP-portal-0 serves again" wait_until 30 pong "$P0" client-a
    counts=$(cx client-a loop-stop s6)
    read -r ok failed <<<"$counts"
    if [[ ${ok:-0} -gt 0 && ${failed:-1} -eq 0 ]]; then
        saw "$DP-portal-1 answered all $ok PINGs (every 100 ms) while $DP-portal-0 was replaced"
    else
        bad "through $DP-portal-1 while $DP-portal-0 was replaced: ${ok:-?} PONG, ${failed:-?} failed"
    fi
    end
}

scenario_delete() {
    begin "7 delete: the DatabasePortal's children are garbage-collected"
    local t0
    t0=$(now_ms)
    kn delete dbp "$DP" --wait=false >/dev/null
    if wait_until 120 no_children_left; then
        saw "ConfigMap, StatefulSet, Services, ServiceAccount, Role, RoleBinding, PDB and pods gone after $(($(now_ms) - t0)) ms"
    else
        bad "left after 120 s: $(kn get "${ALL_CHILDREN[@]}" -o name --ignore-not-found 2>&1 | tr '\n' ' ') $(kn get pods -l "app.kubernetes.io/instance=$DP" -o name 2>&1 | tr '\n' ' ')"
    fi
    end
}

# The minimal DatabasePortal: no tls section, so TLS is terminated (the default) with the
# operator's own CA; clients verify the portals with the CA from the Secret's ca.crt.
readonly MIN=minimal
min_children_gone() {
    ! kn get "secret/$MIN-portal-tls" "secret/$MIN-portal-ca" "statefulset/$MIN-portal" \
        -o name --ignore-not-found 2>/dev/null | grep -q .
}
min_secret() { kn get secret "$MIN-portal-tls" -o jsonpath='{.data.ca\.crt}' 2>/dev/null | grep -q .; }

scenario_minimal() {
    begin "8 minimal: a DatabasePortal without tls gets the operator's own CA"
    local t0 ip name reason out
    t0=$(now_ms)
    kn apply -f - >/dev/null <<EOF
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata:
  name: $MIN
spec:
  engine: redis
  backends:
    - {name: redis-a, address: "$A_HOST:$A_PORT"}
    - {name: redis-b, address: "$B_HOST:$B_PORT"}
EOF
    if wait_until 60 min_secret; then
        saw "Secret $MIN-portal-tls (with ca.crt) after $(($(now_ms) - t0)) ms"
    else
        bad "no Secret $MIN-portal-tls with ca.crt within 60 s; status: $(kn get dbp "$MIN" -o jsonpath='{.status.conditions}' 2>&1)"
        end
        return
    fi
    reason=$(kn get dbp "$MIN" -o jsonpath='{.status.conditions[?(@.type=="Degraded")].reason}')
    check "not Degraded/InvalidSpec (Degraded reason: ${reason:-none})" test "$reason" != InvalidSpec
    min_pods_ready() { pods_ready "$MIN-portal-0" "$MIN-portal-1"; }
    if wait_until 120 min_pods_ready; then
        saw "pods $MIN-portal-0 and $MIN-portal-1 Ready after $(($(now_ms) - t0)) ms"
    else
        bad "portal pods not Ready within 120 s: $(kn get pods -l "app.kubernetes.io/instance=$MIN" -o wide 2>&1 | tr '\n' ' ')"
    fi
    kn get secret "$MIN-portal-tls" -o jsonpath='{.data.ca\.crt}' | base64 -d >"$WORK/min-ca.crt"
    cxi client-a put /tmp/min-ca.crt <"$WORK/min-ca.crt"
    ip=$(svc_ip "$MIN-portal")
    name=$MIN-portal.$NS.svc
    # Within 30 s: the Service may route to the pods a moment after they are Ready.
    out=""
    if wait_until 30 eval '
        out=$(cx client-a verify /tmp/min-ca.crt "$name" "$PORT" "$ip" 2>&1 || true)
        [[ $out == *"SSL certificate verify ok"* ]]'; then
        saw "curl verified $name ($ip:$PORT) against ca.crt: $(echo "$out" | grep -o 'subject: .*' | head -n1)"
    else
        bad "verifying $name against ca.crt: $out"
    fi
    out=$(cx client-a verify /etc/ssl/certs/ca-certificates.crt "$name" "$PORT" "$ip" 2>&1 || true)
    check "without ca.crt the certificate is refused ($(echo "$out" | head -n1))" \
        test "${out/verify ok/}" == "$out"
    ip=$(svc_ip "$MIN-portal-1")
    out=$(cx client-a verified /tmp/min-ca.crt "$MIN-portal-1.$NS.svc" "$ip" "$PORT" PING 2>&1 || true)
    if [[ $out == PONG ]]; then
        saw "redis-cli --tls --cacert ca.crt through Service $MIN-portal-1: PONG"
    else
        bad "redis-cli --tls --cacert ca.crt through Service $MIN-portal-1: $out"
    fi
    t0=$(now_ms)
    kn delete dbp "$MIN" --wait=false >/dev/null
    if wait_until 120 min_children_gone; then
        saw "both Secrets and the StatefulSet collected $(($(now_ms) - t0)) ms after the deletion"
    else
        bad "left 120 s after the deletion: $(kn get secrets,statefulsets -o name 2>&1 | grep "$MIN" | tr '\n' ' ')"
    fi
    end
}

# The operations path in the cluster: the operator's admin token Secret, the portal's verbs
# behind it, and spec.backends[].state shown per portal in the status.
readonly OPS=ops
ops_pods_ready() { pods_ready "$OPS-portal-0" "$OPS-portal-1"; }
ops_token() { kn get secret "$OPS-portal-admin" -o jsonpath='{.data.token}' 2>/dev/null | base64 -d 2>/dev/null; }
ops_status() { cx client-a http "http://$(pod_ip "$1"):8404/status"; }
ops_admin_state() { ops_status "$1" | json '[b["adminState"] for b in d["backends"] if b["name"] == "'"$2"'"][0]'; }
ops_reported() {
    [[ $(kn get dbp "$OPS" -o jsonpath='{.status.portals[*].backends[*].state}') == "$1" ]]
}
ops_children_gone() {
    ! kn get "secret/$OPS-portal-admin" "statefulset/$OPS-portal" -o name --ignore-not-found 2>/dev/null | grep -q .
}

scenario_operations() {
    begin "9 operations: the admin token Secret, drain through the portal and through the spec"
    local t0 token ip out
    t0=$(now_ms)
    kn apply -f - >/dev/null <<EOF
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata:
  name: $OPS
spec:
  engine: redis
  routing: {mode: roundrobin}
  tls: {mode: disabled}
  backends:
    - {name: redis-a, address: "$A_HOST:$A_PORT", weight: 3}
    - {name: redis-b, address: "$B_HOST:$B_PORT"}
EOF
    if wait_until 120 ops_pods_ready; then
        saw "pods $OPS-portal-0 and $OPS-portal-1 Ready after $(($(now_ms) - t0)) ms"
    else
        bad "portal pods not Ready within 120 s: $(kn get pods -l "app.kubernetes.io/instance=$OPS" -o wide 2>&1 | tr '\n' ' ')"
        end
        return
    fi
    token=$(ops_token)
    check "Secret $OPS-portal-admin holds a 64-hex-digit token" eval '[[ $token =~ ^[0-9a-f]{64}$ ]]'
    ip=$(pod_ip "$OPS-portal-0")
    out=$(cx client-a post "" "http://$ip:8404/backends/redis-b/state" '{"state": "drain"}' 2>&1 || true)
    check "POST without the token: 401 ($out)" test "${out%% *}" == 401
    check "redis-b still ready on $OPS-portal-0" test "$(ops_admin_state "$OPS-portal-0" redis-b)" == ready
    out=$(cx client-a post "$token" "http://$ip:8404/backends/redis-b/state" '{"state": "drain"}' 2>&1 || true)
    check "POST with the Secret's token: 200 ($out)" test "${out%% *}" == 200
    check "redis-b drained on $OPS-portal-0 (runtime)" test "$(ops_admin_state "$OPS-portal-0" redis-b)" == drain
    check "redis-b still ready on $OPS-portal-1" test "$(ops_admin_state "$OPS-portal-1" redis-b)" == ready
    if wait_until 30 ops_reported drain; then
        saw "status.portals shows the runtime drain of $OPS-portal-0: $(kn get dbp "$OPS" -o jsonpath='{.status.portals[*].backends}')"
    else
        bad "status.portals does not show the drain: $(kn get dbp "$OPS" -o jsonpath='{.status.portals}')"
    fi
    out=$(cx client-a post "$token" "http://$ip:8404/backends/redis-b/state" '' DELETE 2>&1 || true)
    check "DELETE clears the runtime state ($out)" test "${out%% *}" == 200
    # The same through the spec: every portal applies it.
    kn patch dbp "$OPS" --type json -p '[{"op": "add", "path": "/spec/backends/1/state", "value": "maint"}]' >/dev/null
    t0=$(now_ms)
    if wait_until 30 ops_reported "maint maint"; then
        saw "spec.backends[1].state maint shown by both portals in status.portals after $(($(now_ms) - t0)) ms"
    else
        bad "status.portals after spec.backends[1].state maint: $(kn get dbp "$OPS" -o jsonpath='{.status.portals}')"
    fi
    out=$(kc -n "$NS" describe dbp "$OPS" 2>&1 | grep -c -i "maint" || true)
    check "kubectl describe dbp shows maint ($out lines)" test "${out:-0}" -ge 2
    t0=$(now_ms)
    kn delete dbp "$OPS" --wait=false >/dev/null
    if wait_until 120 ops_children_gone; then
        saw "the admin token Secret and the StatefulSet collected $(($(now_ms) - t0)) ms after the deletion"
    else
        bad "left 120 s after the deletion: $(kn get secrets,statefulsets -o name 2>&1 | grep "$OPS" | tr '\n' ' ')"
    fi
    end
}

# The read-only connection string: a DatabasePortal with readOnly over the primary and the
# replica (whichever is which after scenario 3).
readonly RO=reads
ro_pods_ready() { pods_ready "$RO-portal-0" "$RO-portal-1"; }
ro_field() { kn get dbp "$RO" -o jsonpath="{$1}" 2>/dev/null; }
svc_ports() { kn get service "$1" -o jsonpath='{range .spec.ports[*]}{.name}={.port} {end}' 2>/dev/null; }
ro_children_gone() {
    ! kn get "service/$RO-portal-ro" "statefulset/$RO-portal" -o name --ignore-not-found 2>/dev/null | grep -q .
}

# reaches_run_id IP PORT HOST PORT: within 60 s, client-a reaches through IP:PORT the
# redis-server at HOST:PORT (the same run_id); sets `want` and `got` for the message. Both are
# read in the loop: one slow read must not leave either empty (each gives up after 5 s).
reaches_run_id() {
    local via=$1 via_port=$2 host=$3 port=$4
    want=""
    got=""
    wait_until 60 eval '
        [[ -n $want ]] || want=$(run_id "$host" "$port")
        got=$(cx client-a plain "$via" "$via_port" INFO server | tr -d "\r" | sed -n "s/^run_id://p")
        [[ -n $want && $got == "$want" ]]'
}

scenario_reads() {
    begin "10 reads: the read-only Service reaches the replica"
    local t0 primary replica rhost rport phost pport ip want got out
    if db "$A_HOST" "$A_PORT" INFO replication | grep -q 'role:master'; then
        primary=redis-a replica=redis-b rhost=$B_HOST rport=$B_PORT phost=$A_HOST pport=$A_PORT
    else
        primary=redis-b replica=redis-a rhost=$A_HOST rport=$A_PORT phost=$B_HOST pport=$B_PORT
    fi
    check "$replica replicates from $primary" wait_until 30 eval \
        '[[ $(db "$rhost" "$rport" INFO replication) == *master_link_status:up* ]]'
    t0=$(now_ms)
    kn apply -f - >/dev/null <<EOF
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata:
  name: $RO
spec:
  engine: redis
  tls: {mode: disabled}
  readOnly: {maxLag: 10s}
  healthCheck: {interval: 500ms}
  backends:
    - {name: redis-a, address: "$A_HOST:$A_PORT"}
    - {name: redis-b, address: "$B_HOST:$B_PORT"}
EOF
    if wait_until 120 ro_pods_ready; then
        saw "pods $RO-portal-0 and $RO-portal-1 Ready after $(($(now_ms) - t0)) ms"
    else
        bad "portal pods not Ready within 120 s: $(kn get pods -l "app.kubernetes.io/instance=$RO" -o wide 2>&1 | tr '\n' ' ')"
        kn delete dbp "$RO" --wait=false >/dev/null 2>&1 || true
        end
        return
    fi
    out=$(svc_ports "$RO-portal-ro")
    check "Service $RO-portal-ro serves port 6380 ($out)" test "$out" == "portal-ro=6380 "
    out=$(svc_ports "$RO-portal-0")
    check "Service $RO-portal-0 serves both ports ($out)" test "$out" == "portal=6379 portal-ro=6380 "
    out=$(svc_ports "$RO-portal")
    check "Service $RO-portal serves the main port only ($out)" test "$out" == "portal=6379 "
    ip=$(svc_ip "$RO-portal-ro")
    want=""
    got=""
    if reaches_run_id "$ip" 6380 "$rhost" "$rport"; then
        saw "Service $RO-portal-ro ($ip:6380) reaches the replica $replica (run_id ${want:0:8}) after $(($(now_ms) - t0)) ms"
    else
        bad "Service $RO-portal-ro ($ip:6380) reaches run_id '$got', the replica $replica is '$want'"
    fi
    out=$(cx client-a plain "$ip" 6380 SET e2e:s10 x 2>&1 || true)
    check "a write through $RO-portal-ro is refused by the replica ($out)" eval '[[ $out == *READONLY* ]]'
    ip=$(svc_ip "$RO-portal")
    if reaches_run_id "$ip" 6379 "$phost" "$pport"; then
        saw "Service $RO-portal ($ip:6379) reaches the primary $primary (run_id ${want:0:8})"
    else
        bad "Service $RO-portal ($ip:6379) reaches run_id '$got', the primary $primary is '$want'"
    fi
    if wait_until 60 eval '[[ $(ro_field .status.readOnly.summary) == "$replica" ]]'; then
        saw "status.readOnly: endpoint $(ro_field .status.readOnly.endpoint), serving $(ro_field .status.readOnly.summary)"
    else
        bad "status.readOnly = '$(ro_field .status.readOnly)', want serving $replica"
    fi
    out=$(kn get dbp "$RO" 2>&1 | tr -s ' ' | tr '\n' ' ')
    check "kubectl get dbp shows the Reads column ($out)" eval '[[ $out == *READS* && $out == *" $replica "* ]]'
    t0=$(now_ms)
    kn delete dbp "$RO" --wait=false >/dev/null
    if wait_until 120 ro_children_gone; then
        saw "the read-only Service and the StatefulSet collected $(($(now_ms) - t0)) ms after the deletion"
    else
        bad "left 120 s after the deletion: $(kn get services,statefulsets -o name 2>&1 | grep "$RO" | tr '\n' ' ')"
    fi
    end
}

# --- main ------------------------------------------------------------------------------

main() {
    local t_start
    t_start=$(now_ms)
    log "platform $PLATFORM, databases as $DB_MODE, operator ${DBPORTAL_E2E_OPERATOR:-in-cluster} in $OPERATOR_NS, namespace $NS"
    command -v "$KUBECTL" >/dev/null || { log "kubectl not found"; exit 1; }
    command -v python3 >/dev/null || { log "python3 not found"; exit 1; }
    command -v openssl >/dev/null || { log "openssl not found"; exit 1; }
    if [[ $DB_MODE == host ]]; then
        [[ -n ${DBPORTAL_NODE_IP:-} ]] || { log "DBPORTAL_E2E_DB=host needs DBPORTAL_NODE_IP"; exit 1; }
        command -v redis-server >/dev/null || { log "redis-server not found"; exit 1; }
    fi

    kc create namespace "$NS" >/dev/null
    kn create configmap e2e-client --from-file=c.sh=<(client_script) >/dev/null
    { client_pod client-a; echo ---; client_pod client-b; } | kn apply -f - >/dev/null
    make_cert cert-1 dbportal-e2e-cert-1
    make_cert cert-2 dbportal-e2e-cert-2
    apply_tls_secret cert-1
    start_databases || { log "databases did not start"; exit 1; }
    if ! wait_until 120 pods_ready client-a client-b; then
        log "client pods not Ready"
        kn describe pods -l app=dbportal-e2e-client >&2 || true
        exit 1
    fi
    CLIENT_A_IP=$(pod_ip client-a) CLIENT_B_IP=$(pod_ip client-b)
    if ! wait_until 30 replication_up; then
        log "replica not in sync: $(db "$B_HOST" "$B_PORT" INFO replication 2>&1 | tr -d '\r' | tr '\n' ' ')"
        exit 1
    fi
    log "primary redis-a $A_HOST:$A_PORT, replica redis-b $B_HOST:$B_PORT; clients $CLIENT_A_IP, $CLIENT_B_IP; setup $(($(now_ms) - t_start)) ms"

    local s names=(apply allowlist promote tls configmap pod delete minimal operations reads) i=0
    for s in "${names[@]}"; do
        i=$((i + 1))
        if ! wanted "$i"; then
            skip "$i $s" "not selected by DBPORTAL_E2E_ONLY"
        elif [[ $s == delete && -z $APPLIED ]]; then
            skip "$i $s" "the DatabasePortal was not applied (scenario 1)"
        elif [[ $s != apply && $s != delete && $s != minimal && $s != operations && $s != reads && -z $PREREQ ]]; then
            skip "$i $s" "the DatabasePortal's portals never became Ready (scenario 1)"
        else
            "scenario_$s" || true
        fi
    done
    log "suite took $(($(now_ms) - t_start)) ms"
    echo "e2e result: $PASSED passed, $FAILED failed, $SKIPPED skipped"
    [[ $FAILED -eq 0 ]]
}

main "$@"
