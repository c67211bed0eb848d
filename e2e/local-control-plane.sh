#!/usr/bin/env bash
# Local Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager)
# built entirely from Debian packages, for dbportal's integration tests.
#
#   local-control-plane.sh build [--node]   build/cache the Kubernetes binaries
#   local-control-plane.sh start DIR [MANIFEST...]
#                                           start a control plane with all state in DIR;
#                                           MANIFESTs (e.g. CRDs) are applied before the
#                                           controller manager starts
#   local-control-plane.sh stop DIR         stop the control plane started in DIR
#   local-control-plane.sh env DIR          print `export KUBECONFIG=...` lines
#   local-control-plane.sh bin-dir          print the directory holding the binaries
#
# See e2e/README.md for details.
set -euo pipefail

readonly K8S_VERSION=1.20.2
# Bump whenever the build steps below change: it invalidates the binary stamp.
readonly BUILD_RECIPE=1
# Bump whenever the source preparation (unpack + vendor fix-ups) changes.
readonly SOURCE_RECIPE=2

readonly CACHE_ROOT=${DBPORTAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbportal}
readonly K8S_CACHE=$CACHE_ROOT/k8s-$K8S_VERSION
readonly SRC_DIR=$K8S_CACHE/src
readonly GO_BUILD_CACHE=$K8S_CACHE/go-build
readonly BIN_DIR=$K8S_CACHE/bin
readonly BUILD_LOG=$K8S_CACHE/build.log

readonly CONTROL_PLANE_BINS=(kube-apiserver kube-controller-manager kubectl)
readonly NODE_BINS=(kube-scheduler kubelet kube-proxy)

# Service network; its first address is the in-cluster `kubernetes.default`
# service IP and is in the serving cert. local-node.sh overrides it.
readonly SERVICE_CIDR=${DBPORTAL_LCP_SERVICE_CIDR:-10.244.0.0/24}
# Address the API server listens on and advertises. Default: loopback, with
# no endpoints for the `kubernetes` Service. local-node.sh sets the pod
# bridge's host address so that pods can reach the API server.
readonly ADVERTISE_ADDRESS=${DBPORTAL_LCP_ADVERTISE_ADDRESS:-}
readonly LISTEN_ADDRESS=${ADVERTISE_ADDRESS:-127.0.0.1}

START_TIMEOUT=${DBPORTAL_LCP_START_TIMEOUT:-60}

PROG=$(basename "$0")
readonly PROG

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

# ensure_tools CHECK=PACKAGE...
# CHECK is a command name, or an absolute path that must exist.
ensure_tools() {
    local spec check pkg missing=()
    for spec in "$@"; do
        check=${spec%%=*}
        pkg=${spec#*=}
        if [[ $check == /* ]]; then
            [[ -e $check ]] && continue
        else
            command -v "$check" >/dev/null && continue
        fi
        missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing Debian packages: ${missing[*]}"
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

readonly REFLECT2_DIR=/usr/share/gocode/src/github.com/modern-go/reflect2

ensure_build_tools() {
    ensure_tools /usr/lib/go/bin/go=golang-go make=make rsync=rsync \
        dpkg-source=dpkg-dev "$REFLECT2_DIR/reflect2.go=golang-github-modern-go-reflect2-dev"
}

ensure_runtime_tools() {
    ensure_tools etcd=etcd-server etcdctl=etcd-client openssl=openssl \
        python3=python3 setsid=util-linux flock=util-linux base64=coreutils
}

# Make `apt-get source kubernetes` work: add a deb-src entry if none exists.
ensure_deb_src() {
    if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes$'; then
        return 0
    fi
    log "adding a deb-src entry (/etc/apt/sources.list.d/dbportal-src.sources)"
    local codename
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    as_root tee /etc/apt/sources.list.d/dbportal-src.sources >/dev/null <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=0
    apt_update_once
}

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

go_toolchain_id() { /usr/lib/go/bin/go version; }

# Unpack Debian's `kubernetes` source package into $SRC_DIR and fix up vendor/.
prepare_source() {
    local stamp=$SRC_DIR/.dbportal-source-recipe
    if [[ -f $stamp && $(<"$stamp") == "$SOURCE_RECIPE" ]]; then
        return 0
    fi
    ensure_deb_src
    local tmp=$K8S_CACHE/src.tmp
    rm -rf "$tmp" "$SRC_DIR"
    mkdir -p "$tmp"
    log "fetching Debian source package 'kubernetes' into $tmp"
    # apt's download sandbox user must be able to write here when run as root.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get source -qq kubernetes >&2)
    local unpacked
    unpacked=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [[ -n $unpacked && -f $unpacked/hack/lib/golang.sh ]] ||
        die "apt-get source kubernetes did not produce a kubernetes-* tree in $tmp"
    grep -q "tag: v$K8S_VERSION'" "$unpacked/hack/lib/version.sh" ||
        die "unexpected Kubernetes version in $unpacked (want v$K8S_VERSION)"

    # The vendored reflect2 1.0.1 crashes under Go >= 1.18 (first request that
    # goes through json-iterator, e.g. a CRD); use Debian's 1.0.2 instead.
    local vendored=$unpacked/vendor/github.com/modern-go/reflect2
    cp "$vendored/LICENSE" "$tmp/reflect2.LICENSE"
    rm -rf "$vendored"
    cp -a "$REFLECT2_DIR" "$vendored"
    rm -f "$vendored/go.mod"
    cp "$tmp/reflect2.LICENSE" "$vendored/LICENSE"

    # The OpenAPI type validators treat a value as null when
    #   reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))
    # which compares reflect.Value internals. Since Go 1.19 the runtime boxes
    # an empty string with the same pointer reflect.Zero uses, so every ""
    # in a custom object or CRD default is rejected as "must be of type
    # string: null". Older Go never matched there for decoded JSON, so the
    # intended condition is just `data == nil`.
    local validator
    for validator in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go \
        vendor/github.com/go-openapi/validate/type.go; do
        grep -qF 'if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {' \
            "$unpacked/$validator" || die "unexpected content in $validator"
        sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' \
            "$unpacked/$validator"
    done

    mv "$unpacked" "$SRC_DIR"
    rm -rf "$tmp"
    echo "$SOURCE_RECIPE" >"$stamp"
}

# stamp_want BIN...: what a set's stamp holds once its binaries are built.
stamp_want() { echo "recipe=$BUILD_RECIPE source=$SOURCE_RECIPE k8s=v$K8S_VERSION bins=$*"; }

# up_to_date STAMP_NAME BIN...: the set's stamp matches and every binary is there.
up_to_date() {
    local stamp=$BIN_DIR/.stamp-$1
    shift
    [[ -f $stamp && $(<"$stamp") == "$(stamp_want "$@")"* ]] || return 1
    local b
    for b in "$@"; do [[ -x $BIN_DIR/$b ]] || return 1; done
}

# build_binaries STAMP_NAME BIN...: one `make` for every binary named, so Go compiles the
# packages they share once; the stamp of each set built here (control-plane, node) is
# written after it.
build_binaries() {
    local name=$1
    shift
    if up_to_date "$name" "$@"; then
        log "$name binaries are up to date in $BIN_DIR"
        return 0
    fi

    ensure_build_tools
    prepare_source

    local what=() b
    for b in "$@"; do what+=("cmd/$b"); done
    mkdir -p "$GO_BUILD_CACHE" "$SRC_DIR/_output/local/go" "$BIN_DIR"
    # hack/lib/golang.sh pins GOCACHE to _output/local/go/cache; keep it
    # outside the source tree so it survives a re-unpack.
    ln -sfn "$GO_BUILD_CACHE" "$SRC_DIR/_output/local/go/cache"

    log "building ${what[*]} (log: $BUILD_LOG); ~12 min without a warm Go build cache"
    local started=$SECONDS
    if ! (
        cd "$SRC_DIR"
        export PATH=/usr/lib/go/bin:$PATH
        export CGO_ENABLED=0 GO111MODULE=off GOFLAGS=
        # Build everything statically (also kubelet): no C toolchain needed
        # and a single set of compiled packages is shared by all binaries.
        export KUBE_STATIC_OVERRIDES=kubelet
        echo "=== $(date -u +%FT%TZ) make WHAT='${what[*]}'"
        make WHAT="${what[*]}"
    ) >>"$BUILD_LOG" 2>&1; then
        tail -n 40 "$BUILD_LOG" >&2
        die "build failed; see $BUILD_LOG"
    fi

    for b in "$@"; do
        install -m 0755 "$SRC_DIR/_output/local/bin/linux/amd64/$b" "$BIN_DIR/.$b.tmp"
        mv -f "$BIN_DIR/.$b.tmp" "$BIN_DIR/$b"
    done
    # Each set (control-plane, node) whose binaries all came out of this build is stamped.
    local set bins all
    for set in control-plane node; do
        case $set in
            control-plane) bins=("${CONTROL_PLANE_BINS[@]}") ;;
            node) bins=("${NODE_BINS[@]}") ;;
        esac
        all=1
        for b in "${bins[@]}"; do [[ " $* " == *" $b "* ]] || all=0; done
        if [[ $all -eq 1 ]]; then
            echo "$(stamp_want "${bins[@]}") go=$(go_toolchain_id)" >"$BIN_DIR/.stamp-$set"
        fi
    done
    log "built $* in $((SECONDS - started)) s"
}

cmd_build() {
    local node=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --node) node=1 ;;
            *) usage ;;
        esac
        shift
    done
    [[ $(uname -m) == x86_64 ]] || die "only linux/amd64 is supported"
    mkdir -p "$K8S_CACHE"
    # Serialise concurrent builds (e.g. parallel test binaries).
    exec 9>"$K8S_CACHE/.lock"
    flock 9
    if [[ $node -eq 0 ]]; then
        build_binaries control-plane "${CONTROL_PLANE_BINS[@]}"
    elif up_to_date control-plane "${CONTROL_PLANE_BINS[@]}"; then
        build_binaries node "${NODE_BINS[@]}"
    else
        # Both sets in one build: the node binaries share most packages with the control
        # plane's, and a second `make` would walk (and partly rebuild) the tree again.
        build_binaries all "${CONTROL_PLANE_BINS[@]}" "${NODE_BINS[@]}"
    fi
}

cmd_bin_dir() { echo "$BIN_DIR"; }

# ---------------------------------------------------------------------------
# start / stop / env
# ---------------------------------------------------------------------------

# Component names, in start order (stop goes in reverse).
readonly COMPONENTS=(etcd kube-apiserver kube-controller-manager)

abs_dir() {
    [[ -n ${1:-} ]] || usage
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

# free_ports N [ADDRESS]: print N distinct free TCP ports on ADDRESS
# (default 127.0.0.1).
free_ports() {
    python3 - "$1" "${2:-127.0.0.1}" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind((sys.argv[2], 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# pid_alive PID DIR: true if PID runs and its command line mentions DIR/
# (every process started here has such an argument; guards against PID reuse).
pid_alive() {
    local pid=$1 dir=$2
    process_running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/"
}

# process_running PID: true if PID exists and is not a zombie.
process_running() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# spawn NAME DIR CMD...: start CMD detached (own session, no inherited stdio),
# logging to DIR/NAME.log, PID in DIR/NAME.pid.
spawn() {
    local name=$1 dir=$2
    shift 2
    setsid "$@" </dev/null >>"$dir/$name.log" 2>&1 &
    echo $! >"$dir/$name.pid"
}

fail_start() {
    local dir=$1 name=$2 msg=$3
    log "error: $msg"
    if [[ -f $dir/$name.log ]]; then
        log "last lines of $dir/$name.log:"
        tail -n 30 "$dir/$name.log" >&2
    fi
    cmd_stop "$dir" >/dev/null 2>&1 || true
    exit 1
}

# wait_for NAME DIR DEADLINE CMD...: retry CMD until it succeeds, the
# component NAME dies or DEADLINE (in $SECONDS) passes.
wait_for() {
    local name=$1 dir=$2 deadline=$3
    shift 3
    local pid
    pid=$(<"$dir/$name.pid")
    until "$@" >/dev/null 2>&1; do
        pid_alive "$pid" "$dir" || return 2
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 0.2
    done
}

port_in_use_error() { grep -qE 'address already in use' "$1" 2>/dev/null; }

# first_ip CIDR: the first host address of CIDR.
first_ip() {
    python3 -c 'import ipaddress, sys; print(next(ipaddress.ip_network(sys.argv[1]).hosts()))' "$1"
}

gen_pki() {
    local dir=$1 pki=$1/pki service_ip extra_san=
    service_ip=$(first_ip "$SERVICE_CIDR")
    if [[ -n $ADVERTISE_ADDRESS && $ADVERTISE_ADDRESS != "$service_ip" ]]; then
        extra_san=", IP:$ADVERTISE_ADDRESS"
    fi
    mkdir -p "$pki"
    chmod 0700 "$pki"
    cat >"$pki/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[serving]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, IP:$service_ip$extra_san, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
EOF
    # ECDSA P-256 keys: generated in milliseconds (RSA takes ~0.5 s each).
    local key
    for key in ca apiserver sa; do
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
            -out "$pki/$key.key" 2>/dev/null
    done
    openssl req -config "$pki/openssl.cnf" -new -x509 -sha256 -days 3650 \
        -key "$pki/ca.key" -subj "/CN=dbportal-local-ca" -extensions ca \
        -out "$pki/ca.crt"
    openssl req -config "$pki/openssl.cnf" -new -sha256 \
        -key "$pki/apiserver.key" -subj "/CN=kube-apiserver" -out "$pki/apiserver.csr"
    openssl x509 -req -sha256 -days 3650 -in "$pki/apiserver.csr" \
        -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
        -extfile "$pki/openssl.cnf" -extensions serving -out "$pki/apiserver.crt" 2>/dev/null
    rm -f "$pki/apiserver.csr"
    # Service-account token signing key pair (ES256 tokens).
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    chmod 0600 "$pki"/*.key
}

readonly OPERATOR_USER=system:serviceaccount:dbportal-system:dbportal-operator
readonly OPERATOR_GROUPS=system:serviceaccounts,system:serviceaccounts:dbportal-system,system:authenticated

gen_tokens() {
    local dir=$1 admin kcm operator
    admin=$(openssl rand -hex 24)
    kcm=$(openssl rand -hex 24)
    operator=$(openssl rand -hex 24)
    # token,user,uid,"group1,group2"
    cat >"$dir/pki/tokens.csv" <<EOF
$admin,admin,admin,"system:masters"
$kcm,system:kube-controller-manager,system:kube-controller-manager
$operator,$OPERATOR_USER,dbportal-operator,"$OPERATOR_GROUPS"
EOF
    # More identities (local-node.sh: kubelet, scheduler, kube-proxy).
    if [[ -n ${DBPORTAL_LCP_EXTRA_TOKENS:-} ]]; then
        cat "$DBPORTAL_LCP_EXTRA_TOKENS" >>"$dir/pki/tokens.csv"
    fi
    chmod 0600 "$dir/pki/tokens.csv"
    printf '%s\n' "$admin" >"$dir/pki/admin.token"
    printf '%s\n' "$kcm" >"$dir/pki/kube-controller-manager.token"
    printf '%s\n' "$operator" >"$dir/pki/operator.token"
}

# write_kubeconfig FILE SERVER USER TOKEN
write_kubeconfig() {
    local file=$1 server=$2 user=$3 token=$4 ca
    ca=$(base64 -w0 <"$(dirname "$file")/pki/ca.crt")
    cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dbportal-local
  cluster:
    server: $server
    certificate-authority-data: $ca
users:
- name: $user
  user:
    token: $token
contexts:
- name: $user@dbportal-local
  context:
    cluster: dbportal-local
    user: $user
    namespace: default
current-context: $user@dbportal-local
EOF
    chmod 0600 "$file.tmp"
    mv -f "$file.tmp" "$file"
}

start_etcd() {
    local dir=$1 client_port=$2 peer_port=$3
    mkdir -p "$dir/etcd"
    chmod 0700 "$dir/etcd"
    spawn etcd "$dir" etcd \
        --name=dbportal-local \
        --data-dir="$dir/etcd" \
        --listen-client-urls="http://127.0.0.1:$client_port" \
        --advertise-client-urls="http://127.0.0.1:$client_port" \
        --listen-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-cluster="dbportal-local=http://127.0.0.1:$peer_port" \
        --listen-metrics-urls= \
        --unsafe-no-fsync=true \
        --log-level=warn --logger=zap
}

start_apiserver() {
    local dir=$1 port=$2 etcd_port=$3 pki=$1/pki extra=() reconciler=()
    read -r -a extra <<<"${DBPORTAL_LCP_APISERVER_FLAGS:-}"
    # Loopback is useless as the `kubernetes` Service's endpoint.
    [[ -n $ADVERTISE_ADDRESS ]] || reconciler=(--endpoint-reconciler-type=none)
    spawn kube-apiserver "$dir" "$BIN_DIR/kube-apiserver" \
        --bind-address="$LISTEN_ADDRESS" \
        --secure-port="$port" \
        --advertise-address="$LISTEN_ADDRESS" \
        "${reconciler[@]}" \
        --etcd-servers="http://127.0.0.1:$etcd_port" \
        --cert-dir="$dir/apiserver" \
        --tls-cert-file="$pki/apiserver.crt" \
        --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --token-auth-file="$pki/tokens.csv" \
        --authorization-mode=Node,RBAC \
        --service-account-key-file="$pki/sa.pub" \
        --service-account-signing-key-file="$pki/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --allow-privileged=true \
        --profiling=false \
        --v="${DBPORTAL_LCP_VERBOSITY:-0}" \
        "${extra[@]}"
}

start_controller_manager() {
    local dir=$1 pki=$1/pki extra=()
    read -r -a extra <<<"${DBPORTAL_LCP_CONTROLLER_MANAGER_FLAGS:-}"
    spawn kube-controller-manager "$dir" "$BIN_DIR/kube-controller-manager" \
        --kubeconfig="$dir/kube-controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 \
        --secure-port=0 \
        --port=0 \
        --leader-elect=false \
        --controllers='*,-cloud-node-lifecycle,-service,-route' \
        --service-account-private-key-file="$pki/sa.key" \
        --root-ca-file="$pki/ca.crt" \
        --use-service-account-credentials=true \
        --cluster-signing-cert-file="$pki/ca.crt" \
        --cluster-signing-key-file="$pki/ca.key" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --kube-api-qps=100 --kube-api-burst=200 \
        --profiling=false \
        --v="${DBPORTAL_LCP_VERBOSITY:-0}" \
        "${extra[@]}"
}

# True once the default service account exists and has its token secret
# (proves the serviceaccount and serviceaccount-token controllers run).
default_sa_ready() {
    local secrets
    secrets=$(kc "$1" -n default get serviceaccount default \
        -o 'jsonpath={.secrets[*].name}' 2>/dev/null) || return 1
    [[ -n $secrets ]]
}

kc() {
    local dir=$1
    shift
    "$BIN_DIR/kubectl" --kubeconfig="$dir/admin.kubeconfig" --request-timeout=5s "$@"
}

now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }

# Absolute path of this script (the watchdog re-executes it).
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/$(basename "${BASH_SOURCE[0]}")
readonly SELF

# apply_manifests DIR DEADLINE FILE...: apply manifests (typically CRDs)
# before the controller manager starts, so that its first API discovery
# already covers them (garbage collection of custom-resource owners then
# works right away instead of after the next 30 s rediscovery).
apply_manifests() {
    local dir=$1 deadline=$2
    shift 2
    local m
    for m in "$@"; do
        kc "$dir" apply --validate=false -f "$m" >&2 ||
            fail_start "$dir" kube-apiserver "applying $m failed"
    done
    if [[ -n $(kc "$dir" get customresourcedefinitions -o name 2>/dev/null) ]]; then
        kc "$dir" wait --for=condition=Established --all customresourcedefinitions \
            --timeout="$((deadline > SECONDS ? deadline - SECONDS : 1))s" >/dev/null ||
            fail_start "$dir" kube-apiserver "CustomResourceDefinitions not established"
    fi
}

# Hidden subcommand run by the watchdog: stop the control plane in DIR once
# process OWNER is gone.
cmd_watch() {
    local owner=$1 dir=$2
    while process_running "$owner"; do
        sleep 1
    done
    log "owner process $owner exited; stopping the control plane in $dir"
    cmd_stop "$dir"
}

start_watchdog() {
    local dir=$1 owner=$2
    if ! [[ $owner =~ ^[0-9]+$ ]] || ! process_running "$owner"; then
        die "DBPORTAL_LCP_WATCH_PID=$owner is not a running process"
    fi
    spawn watchdog "$dir" "$SELF" __watch "$owner" "$dir/"
}

cmd_start() {
    [[ $# -ge 1 ]] || usage
    local dir
    dir=$(abs_dir "$1")
    shift
    local manifests=("$@") m b
    for m in "${manifests[@]}"; do
        [[ -e $m ]] || die "no such manifest: $m"
    done
    for b in "${CONTROL_PLANE_BINS[@]}"; do
        [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing; run '$SELF build' first"
    done
    ensure_runtime_tools
    for b in "${COMPONENTS[@]}" watchdog; do
        if [[ -f $dir/$b.pid ]] && pid_alive "$(<"$dir/$b.pid")" "$dir"; then
            die "a control plane is already running in $dir (stop it first)"
        fi
    done
    rm -rf "$dir/etcd" "$dir/pki" "$dir/env"

    local t0 deadline=$((SECONDS + START_TIMEOUT))
    t0=$(now_ms)
    if [[ -n ${DBPORTAL_LCP_WATCH_PID:-} ]]; then
        start_watchdog "$dir" "$DBPORTAL_LCP_WATCH_PID"
    fi
    gen_pki "$dir"
    gen_tokens "$dir"

    local attempt etcd_port etcd_peer_port api_port rc
    for attempt in 1 2 3 4 5; do
        read -r etcd_port etcd_peer_port <<<"$(free_ports 2)"
        api_port=$(free_ports 1 "$LISTEN_ADDRESS")

        : >"$dir/etcd.log"
        start_etcd "$dir" "$etcd_port" "$etcd_peer_port"
        rc=0
        wait_for etcd "$dir" "$deadline" \
            etcdctl --endpoints="http://127.0.0.1:$etcd_port" --dial-timeout=1s \
            --command-timeout=2s endpoint health || rc=$?
        if [[ $rc -eq 2 ]] && port_in_use_error "$dir/etcd.log"; then
            log "etcd: port clash, retrying with other ports (attempt $attempt)"
            rm -rf "$dir/etcd"
            continue
        fi
        [[ $rc -eq 0 ]] || fail_start "$dir" etcd "etcd did not become healthy"
        log "etcd ready on 127.0.0.1:$etcd_port after $(($(now_ms) - t0)) ms"

        write_kubeconfig "$dir/admin.kubeconfig" "https://$LISTEN_ADDRESS:$api_port" \
            admin "$(<"$dir/pki/admin.token")"
        : >"$dir/kube-apiserver.log"
        start_apiserver "$dir" "$api_port" "$etcd_port"
        rc=0
        wait_for kube-apiserver "$dir" "$deadline" kc "$dir" get --raw /readyz || rc=$?
        if [[ $rc -eq 2 ]] && port_in_use_error "$dir/kube-apiserver.log"; then
            log "kube-apiserver: port clash, retrying with other ports (attempt $attempt)"
            stop_components "$dir"
            rm -rf "$dir/etcd"
            continue
        fi
        [[ $rc -eq 0 ]] || fail_start "$dir" kube-apiserver "kube-apiserver did not become ready"
        log "kube-apiserver ready on $LISTEN_ADDRESS:$api_port after $(($(now_ms) - t0)) ms"
        break
    done
    [[ -f $dir/kube-apiserver.pid ]] || fail_start "$dir" kube-apiserver "could not find free ports"

    local server=https://$LISTEN_ADDRESS:$api_port
    write_kubeconfig "$dir/kube-controller-manager.kubeconfig" "$server" \
        system:kube-controller-manager "$(<"$dir/pki/kube-controller-manager.token")"
    write_kubeconfig "$dir/operator.kubeconfig" "$server" \
        dbportal-operator "$(<"$dir/pki/operator.token")"

    if [[ ${#manifests[@]} -gt 0 ]]; then
        apply_manifests "$dir" "$deadline" "${manifests[@]}"
        log "manifests applied after $(($(now_ms) - t0)) ms"
    fi

    : >"$dir/kube-controller-manager.log"
    start_controller_manager "$dir"

    wait_for kube-apiserver "$dir" "$deadline" kc "$dir" get namespace default ||
        fail_start "$dir" kube-apiserver "namespace 'default' did not appear"
    wait_for kube-controller-manager "$dir" "$deadline" default_sa_ready "$dir" ||
        fail_start "$dir" kube-controller-manager \
            "service account 'default' (with token) did not appear"

    cat >"$dir/env" <<EOF
KUBECONFIG=$dir/admin.kubeconfig
DBPORTAL_OPERATOR_KUBECONFIG=$dir/operator.kubeconfig
DBPORTAL_APISERVER_URL=$server
DBPORTAL_K8S_BIN_DIR=$BIN_DIR
DBPORTAL_ETCD_ENDPOINT=http://127.0.0.1:$etcd_port
EOF
    log "control plane up at $server after $(($(now_ms) - t0)) ms (state: $dir)"
    echo "$dir/admin.kubeconfig"
}

# stop_pid NAME DIR: stop the process recorded in DIR/NAME.pid, if it is ours.
stop_pid() {
    local name=$1 dir=$2 pidfile=$2/$1.pid pid waited=0
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ && $pid -ne $$ ]] && pid_alive "$pid" "$dir"; then
        kill -TERM "$pid" 2>/dev/null || true
        while pid_alive "$pid" "$dir"; do
            if [[ $waited -eq 100 ]]; then
                log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop_components() {
    local dir=$1 i
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop_pid "${COMPONENTS[i]}" "$dir"
    done
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    [[ -d $1 ]] || return 0
    local dir
    dir=$(cd "$1" && pwd -P)
    stop_pid watchdog "$dir"
    stop_components "$dir"
}

cmd_env() {
    [[ $# -eq 1 ]] || usage
    local dir
    dir=$(cd "$1" && pwd -P) || die "no such directory: $1"
    [[ -f $dir/env ]] || die "no control plane was started in $dir"
    local line
    while IFS= read -r line; do
        printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"
    done <"$dir/env"
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd=$1
    shift
    case $cmd in
        build) cmd_build "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        env) cmd_env "$@" ;;
        bin-dir) cmd_bin_dir "$@" ;;
        __watch) cmd_watch "$@" ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

# `exit` in the same compound command: bash never reads past this point, so
# editing the file while a long build runs cannot confuse the running shell.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
    exit $?
fi
