#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 cluster built from Debian packages: the
# local control plane (local-control-plane.sh) plus containerd, runc, the CNI
# bridge plugin, kubelet, kube-scheduler and kube-proxy (iptables mode).
#
#   local-node.sh start DIR [MANIFEST...]   start the cluster with all state in DIR;
#                                           prints the admin kubeconfig path last
#   local-node.sh stop DIR                  stop it and undo every host change
#   local-node.sh env DIR                   print `export NAME=value` lines
#   local-node.sh free-net                  print the 10.N the pods would get (what
#                                           `start` picks; e2e/tests checks it)
#
# Needs root (network bridge, iptables, mounts). Only one node cluster can run
# on a machine at a time (fixed bridge, addresses and kubelet port); plain
# control planes (local-control-plane.sh) can run beside it.
# See e2e/README.md for details.
set -euo pipefail

readonly NODE_NAME=dbportal-node
readonly BRIDGE=dbportal0
readonly NODE_SERVICE_CIDR=10.96.0.0/24

# free_node_net: prints the /16 (as "10.244") for the node's bridge and pods:
# DBPORTAL_NODE_NET when set, else 10.244 (flannel's default too), else the
# first of 10.245 ... 10.254 that nothing on this machine routes or holds. A
# leftover bridge of another cluster (flannel's cni0 with 10.244.0.1) would
# make this node's pods unreachable ("no route to host"), so a network in use
# is never taken; what is in the way is said plainly. The Service range must
# be free as well. Routes of this script's own bridge do not count (a
# previous run's, removed before the node starts).
free_node_net() {
    { ip -4 -o route show table all; echo ---; ip -4 -o addr show; } |
        python3 -c '
import ipaddress, os, sys
routes, addrs = sys.stdin.read().split("---\n")
bridge, service = sys.argv[1], ipaddress.ip_network(sys.argv[2])
types = {"unicast", "local", "broadcast", "multicast", "unreachable", "blackhole",
         "prohibit", "throw", "nat", "anycast"}
taken = []  # (network, what holds it)
for line in routes.splitlines():
    f = line.split()
    if not f:
        continue
    dst = f[1] if f[0] in types else f[0]
    dev = f[f.index("dev") + 1] if "dev" in f else ""
    if dst == "default" or dev == bridge:
        continue
    try:
        net = ipaddress.ip_network(dst, strict=False)
    except ValueError:
        continue
    if net.prefixlen > 0:
        taken.append((net, "route " + " ".join(f[:f.index("dev") + 2] if dev else f[:1])))
for line in addrs.splitlines():
    f = line.split()
    if len(f) > 3 and f[2] == "inet" and f[1] != bridge:
        taken.append((ipaddress.ip_interface(f[3]).network, "address %s on %s" % (f[3], f[1])))
def users(net):
    return sorted({why for n, why in taken if n.overlaps(net)})
if users(service):
    sys.exit("the Service range %s is in use on this machine: %s"
             % (service, "; ".join(users(service))))
wanted = os.environ.get("DBPORTAL_NODE_NET", "")
for net in [wanted] if wanted else ["10.%d" % i for i in range(244, 255)]:
    found = users(ipaddress.ip_network(net + ".0.0/16"))
    if not found:
        print(net)
        sys.exit(0)
    print("%s.0.0/16 is in use on this machine: %s (a leftover bridge of another cluster, "
          "such as flannel%%s cni0, goes with: ip link delete cni0)" % (net, "; ".join(found))
          % "\x27s", file=sys.stderr)
sys.exit("no free network for the pods of the node%s; free one, or set DBPORTAL_NODE_NET=10.N "
         "naming a free 10.N.0.0/16" % (" in DBPORTAL_NODE_NET" if wanted else " in 10.244-10.254"))
' "$BRIDGE" "$NODE_SERVICE_CIDR"
}

if [[ ${1:-} == start ]]; then
    NODE_NET=$(free_node_net) || {
        echo "local-node.sh: error: cannot start the node (see above)" >&2
        exit 1
    }
    [[ $NODE_NET == 10.244 ]] ||
        echo "local-node.sh: pods get $NODE_NET.0.0/16 instead (bridge $BRIDGE, $NODE_NET.0.1)" >&2
else
    NODE_NET=${DBPORTAL_NODE_NET:-10.244}
fi
# Network layout of the node (one node cluster per machine).
readonly NODE_NET
readonly NODE_IP=$NODE_NET.0.1
readonly POD_SUBNET=$NODE_NET.0.0/24
readonly POD_RANGE_START=$NODE_NET.0.10
readonly POD_RANGE_END=$NODE_NET.0.250
readonly CLUSTER_CIDR=$NODE_NET.0.0/16
readonly KUBELET_PORT=10250
# Marks the machine-wide node: holds the DIR of the running node cluster.
readonly MARKER=/run/dbportal-local-node

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly E2E_DIR
readonly LCP=$E2E_DIR/local-control-plane.sh
NODE_SELF=$E2E_DIR/$(basename "${BASH_SOURCE[0]}")
readonly NODE_SELF

# The control plane's helpers (log, spawn, stop_pid, write_kubeconfig, ...)
# and its settings; the node's service range and API address are passed
# down to it through its environment variables.
export DBPORTAL_LCP_SERVICE_CIDR=$NODE_SERVICE_CIDR
export DBPORTAL_LCP_ADVERTISE_ADDRESS=$NODE_IP
# shellcheck source=e2e/local-control-plane.sh
source "$LCP"

readonly NODE_COMPONENTS=(containerd kube-scheduler kube-proxy kubelet)

# The kubelet's built-in ECR credential provider asks the AWS SDK for
# credentials at start-up, whose default chain queries the EC2 metadata
# address (169.254.169.254). Nothing may leave the machine: switch it off.
export AWS_EC2_METADATA_DISABLED=true

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "$NODE_SELF" >&2
    exit 2
}

ensure_node_tools() {
    ensure_tools containerd=containerd runc=runc ctr=containerd \
        /usr/lib/cni/bridge=containernetworking-plugins \
        /usr/lib/cni/host-local=containernetworking-plugins \
        /usr/lib/cni/loopback=containernetworking-plugins \
        iptables=iptables conntrack=conntrack ip=iproute2 mount=mount \
        gcc=gcc /usr/include/stdio.h=libc6-dev \
        /etc/ssl/certs/ca-certificates.crt=ca-certificates
}

sysctl_path() { echo "/proc/sys/${1//.//}"; }

# set_sysctl DIR NAME VALUE: set a sysctl, remembering its old value once.
set_sysctl() {
    local dir=$1 name=$2 value=$3 path
    path=$(sysctl_path "$name")
    [[ -f $path ]] || return 0
    if ! grep -q "^$name=" "$dir/node/sysctl.orig" 2>/dev/null; then
        echo "$name=$(<"$path")" >>"$dir/node/sysctl.orig"
    fi
    echo "$value" >"$path"
}

restore_sysctls() {
    local dir=$1 line
    [[ -f $dir/node/sysctl.orig ]] || return 0
    while IFS= read -r line; do
        echo "${line#*=}" >"$(sysctl_path "${line%%=*}")" 2>/dev/null || true
    done <"$dir/node/sysctl.orig"
    rm -f "$dir/node/sysctl.orig"
}

setup_network() {
    local dir=$1
    # (Called in a `||` list, where `set -e` does not apply.)
    ip link add "$BRIDGE" type bridge || return 1
    ip addr add "$NODE_IP/${POD_SUBNET#*/}" dev "$BRIDGE" || return 1
    ip link set "$BRIDGE" up || return 1
    # Host -> ClusterIP traffic leaves with the bridge address and never
    # takes the default route (kube-proxy DNATs it to a pod or rejects it).
    ip route add "$NODE_SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP" || return 1
    # Pod -> ClusterIP -> pod on the same bridge is routed through the host;
    # br_netfilter makes the replies see kube-proxy's NAT.
    set_sysctl "$dir" net.ipv4.ip_forward 1 || return 1
    set_sysctl "$dir" net.bridge.bridge-nf-call-iptables 1 || return 1
}

write_cni_config() {
    local dir=$1
    mkdir -p "$dir/cni/net.d" "$dir/cni/ipam"
    cat >"$dir/cni/net.d/10-dbportal.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "dbportal",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$POD_SUBNET", "rangeStart": "$POD_RANGE_START",
                     "rangeEnd": "$POD_RANGE_END", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$CLUSTER_CIDR"}, {"dst": "$NODE_SERVICE_CIDR"}]
      }
    }
  ]
}
EOF
}

write_containerd_config() {
    local dir=$1 c=$1/containerd
    mkdir -p "$c/root" "$c/state" "$c/opt"
    cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/dbportal/pause:dev"
  # No CAP_SYS_RESOURCE in some containers: never lower oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$c/state/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1
EOF
}

ctr_() { ctr --address "$1/containerd/containerd.sock" --timeout 10s -n k8s.io "${@:2}"; }

write_kubelet_config() {
    local dir=$1 k=$1/kubelet
    mkdir -p "$k/pki" "$k/volume-plugins"
    # No cluster DNS: pods get an empty resolv.conf, so name lookups fail
    # fast inside the pod instead of leaving the machine.
    : >"$k/resolv.conf"
    cat >"$k/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzPort: 0
# Reachable on the bridge address only; no client certificates exist for
# the API server, so logs/exec/port-forward use anonymous access.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
oomScoreAdj: 0
makeIPTablesUtilChains: false
resolvConf: $k/resolv.conf
clusterDomain: cluster.local
volumePluginDir: $k/volume-plugins
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
fileCheckFrequency: 10s
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
maxPods: 110
EOF
}

gen_node_tokens() {
    local dir=$1 kubelet scheduler proxy
    mkdir -p "$dir/node"
    kubelet=$(openssl rand -hex 24)
    scheduler=$(openssl rand -hex 24)
    proxy=$(openssl rand -hex 24)
    cat >"$dir/node/tokens.csv" <<EOF
$kubelet,system:node:$NODE_NAME,kubelet,"system:nodes"
$scheduler,system:kube-scheduler,system:kube-scheduler
$proxy,system:kube-proxy,system:kube-proxy
EOF
    chmod 0600 "$dir/node/tokens.csv"
}

node_token() { awk -F, -v u="$2" '$2 == u { print $1 }' "$1/node/tokens.csv"; }

start_node_components() {
    local dir=$1 server=$2 healthz_port metrics_port
    write_kubeconfig "$dir/kubelet.kubeconfig" "$server" "system:node:$NODE_NAME" \
        "$(node_token "$dir" "system:node:$NODE_NAME")"
    write_kubeconfig "$dir/kube-scheduler.kubeconfig" "$server" system:kube-scheduler \
        "$(node_token "$dir" system:kube-scheduler)"
    write_kubeconfig "$dir/kube-proxy.kubeconfig" "$server" system:kube-proxy \
        "$(node_token "$dir" system:kube-proxy)"

    : >"$dir/kube-scheduler.log"
    spawn kube-scheduler "$dir" "$BIN_DIR/kube-scheduler" \
        --kubeconfig="$dir/kube-scheduler.kubeconfig" \
        --leader-elect=false --port=0 --secure-port=0 \
        --profiling=false --v="${DBPORTAL_LCP_VERBOSITY:-0}"

    read -r healthz_port metrics_port <<<"$(free_ports 2)"
    : >"$dir/kube-proxy.log"
    spawn kube-proxy "$dir" "$BIN_DIR/kube-proxy" \
        --kubeconfig="$dir/kube-proxy.kubeconfig" \
        --hostname-override="$NODE_NAME" \
        --bind-address="$NODE_IP" \
        --cluster-cidr="$CLUSTER_CIDR" \
        --proxy-mode=iptables \
        --healthz-bind-address="127.0.0.1:$healthz_port" \
        --metrics-bind-address="127.0.0.1:$metrics_port" \
        --conntrack-max-per-core=0 \
        --conntrack-tcp-timeout-established=0 \
        --conntrack-tcp-timeout-close-wait=0 \
        --oom-score-adj=0 \
        --profiling=false --v="${DBPORTAL_LCP_VERBOSITY:-0}"

    write_kubelet_config "$dir"
    : >"$dir/kubelet.log"
    spawn kubelet "$dir" "$BIN_DIR/kubelet" \
        --config="$dir/kubelet/config.yaml" \
        --kubeconfig="$dir/kubelet.kubeconfig" \
        --root-dir="$dir/kubelet/root" \
        --volume-plugin-dir="$dir/kubelet/volume-plugins" \
        --cert-dir="$dir/kubelet/pki" \
        --container-runtime=remote \
        --container-runtime-endpoint="unix://$dir/containerd/containerd.sock" \
        --runtime-request-timeout=2m \
        --hostname-override="$NODE_NAME" \
        --node-ip="$NODE_IP" \
        --v="${DBPORTAL_LCP_VERBOSITY:-0}"
}

node_ready() {
    [[ $(kc "$1" get node "$NODE_NAME" \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# kube-proxy has programmed the `kubernetes` Service.
proxy_synced() { iptables-save -t nat 2>/dev/null | grep -q 'default/kubernetes:https'; }

fail_node() {
    local dir=$1 name=$2 msg=$3
    log "error: $msg"
    if [[ -f $dir/$name.log ]]; then
        log "last lines of $dir/$name.log:"
        tail -n 30 "$dir/$name.log" >&2
    fi
    cmd_node_stop "$dir" >/dev/null 2>&1 || true
    exit 1
}

# Host directories written to whatever the settings: the kubelet's pod
# logs and device-plugin socket, libcni's result cache, containerd's shim
# sockets (all fixed paths in these versions), and the kubelet's default
# volume plugin directory as a safety net. `stop` removes what was added.
readonly HOST_DIRS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni
    /run/containerd /usr/libexec/kubernetes)

host_dir_record() { echo "$1/node/before${2//\//_}"; }

remember_host_dirs() {
    local dir=$1 d
    for d in "${HOST_DIRS[@]}"; do
        if [[ -d $d ]]; then
            find "$d" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort >"$(host_dir_record "$dir" "$d")"
        else
            echo "__created__" >"$(host_dir_record "$dir" "$d")"
        fi
    done
}

forget_host_dirs() {
    local dir=$1 d before entry
    for d in "${HOST_DIRS[@]}"; do
        before=$(host_dir_record "$dir" "$d")
        [[ -f $before && -d $d ]] || continue
        if [[ $(head -n1 "$before") == __created__ ]]; then
            rm -rf "$d"
        else
            while IFS= read -r entry; do
                grep -qxF -- "$entry" "$before" || rm -rf "${d:?}/$entry"
            done < <(find "$d" -mindepth 1 -maxdepth 1 -printf '%f\n')
        fi
        rm -f "$before"
    done
}

cmd_node_start() {
    [[ $# -ge 1 ]] || usage
    [[ $(id -u) -eq 0 ]] || die "must run as root (bridge, iptables, mounts)"
    [[ $(uname -m) == x86_64 ]] || die "only linux/amd64 is supported"
    local dir
    dir=$(abs_dir "$1")
    shift
    local b
    for b in "${CONTROL_PLANE_BINS[@]}" "${NODE_BINS[@]}"; do
        [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing; run '$LCP build --node' first"
    done
    if [[ -f $MARKER ]]; then
        local other
        other=$(<"$MARKER")
        if [[ -f $other/containerd.pid ]] && pid_alive "$(<"$other/containerd.pid")" "$other"; then
            die "a node cluster is already running in $other (stop it first: $NODE_SELF stop $other)"
        fi
        log "cleaning up after a node cluster in $other that was not stopped"
        cmd_node_stop "$other" || true
        if [[ -f $MARKER ]]; then
            # Its DIR is gone: undo what does not need it.
            ip link del "$BRIDGE" 2>/dev/null || true
            remove_proxy_rules
            rm -f "$MARKER"
        fi
    fi
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        die "network interface $BRIDGE exists already; is another node cluster running?"
    fi
    ensure_node_tools
    ensure_runtime_tools
    local owner=${DBPORTAL_LCP_WATCH_PID:-}
    if [[ -n $owner ]] && ! process_running "$owner"; then
        die "DBPORTAL_LCP_WATCH_PID=$owner is not a running process"
    fi

    local t0 deadline=$((SECONDS + ${DBPORTAL_NODE_START_TIMEOUT:-120}))
    t0=$(now_ms)
    # Leftovers of an earlier run in DIR (stop removes mounts first).
    cmd_node_stop "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir/node" "$dir/containerd" "$dir/cni" "$dir/kubelet"
    mkdir -p "$dir/node"
    echo "$dir" >"$MARKER"
    remember_host_dirs "$dir"
    if [[ -n $owner ]]; then
        spawn node-watchdog "$dir" "$NODE_SELF" __watch "$owner" "$dir/"
    fi

    setup_network "$dir" || fail_node "$dir" none "network setup failed"
    log "bridge $BRIDGE ($NODE_IP) up after $(($(now_ms) - t0)) ms"

    # Control plane: API server on the bridge address (pods reach it as the
    # `kubernetes` Service), node identities in its token file.
    gen_node_tokens "$dir"
    local kubeconfig
    # The API server reaches the kubelet (logs, exec) by the node's IP: the
    # node name would be looked up in DNS.
    kubeconfig=$(env -u DBPORTAL_LCP_WATCH_PID DBPORTAL_LCP_EXTRA_TOKENS="$dir/node/tokens.csv" \
        DBPORTAL_LCP_APISERVER_FLAGS="--kubelet-preferred-address-types=InternalIP ${DBPORTAL_LCP_APISERVER_FLAGS:-}" \
        "$LCP" start "$dir" "$@" | tail -n1) || fail_node "$dir" none "control plane did not start"
    local server
    server=$(sed -n 's/^DBPORTAL_APISERVER_URL=//p' "$dir/env")
    log "control plane up after $(($(now_ms) - t0)) ms"

    write_cni_config "$dir"
    write_containerd_config "$dir"
    : >"$dir/containerd.log"
    spawn containerd "$dir" containerd --config "$dir/containerd/config.toml"
    wait_for containerd "$dir" "$deadline" ctr_ "$dir" version ||
        fail_node "$dir" containerd "containerd did not start"
    "$E2E_DIR/build-images.sh" --only pause "$dir" ||
        fail_node "$dir" containerd "could not import the pause image"
    log "containerd up, pause image imported after $(($(now_ms) - t0)) ms"

    start_node_components "$dir" "$server"
    wait_for kubelet "$dir" "$deadline" node_ready "$dir" ||
        fail_node "$dir" kubelet "node $NODE_NAME did not become Ready"
    # The not-ready taint set at registration is normally lifted by the node
    # lifecycle controller; lift it here so pods schedule at once either way.
    kc "$dir" taint node "$NODE_NAME" node.kubernetes.io/not-ready:NoSchedule- \
        >/dev/null 2>&1 || true
    wait_for kube-proxy "$dir" "$deadline" proxy_synced ||
        fail_node "$dir" kube-proxy "kube-proxy did not program the kubernetes Service"
    local pid
    for b in kube-scheduler kube-proxy kubelet containerd; do
        pid=$(<"$dir/$b.pid")
        pid_alive "$pid" "$dir" || fail_node "$dir" "$b" "$b exited"
    done

    cat >>"$dir/env" <<EOF
DBPORTAL_NODE_NAME=$NODE_NAME
DBPORTAL_NODE_IP=$NODE_IP
DBPORTAL_NODE_BRIDGE=$BRIDGE
DBPORTAL_POD_SUBNET=$POD_SUBNET
DBPORTAL_SERVICE_CIDR=$NODE_SERVICE_CIDR
DBPORTAL_CONTAINERD_ADDRESS=$dir/containerd/containerd.sock
EOF
    log "node $NODE_NAME Ready after $(($(now_ms) - t0)) ms (state: $dir)"
    echo "$kubeconfig"
}

# Kill every container of our containerd, so that its shims exit.
kill_containers() {
    local dir=$1 id ids
    ids=$(ctr_ "$dir" tasks ls -q 2>/dev/null) || return 0
    for id in $ids; do
        ctr_ "$dir" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $ids; do
        local n=0
        until ctr_ "$dir" tasks delete "$id" >/dev/null 2>&1; do
            ctr_ "$dir" tasks ls -q 2>/dev/null | grep -qxF -- "$id" || break
            [[ $((n += 1)) -lt 50 ]] || break
            sleep 0.1
        done
    done
}

# Containers and shims left behind (containerd died, or a task would not
# go): each task's init PID is recorded in containerd's state dir; its
# parent is the shim, recognised by our containerd socket on its command line.
stop_leftover_tasks() {
    local dir=$1 pidfile pid shim shims=()
    while IFS= read -r pidfile; do
        pid=$(<"$pidfile")
        if ! [[ $pid =~ ^[0-9]+$ ]] || ! process_running "$pid"; then continue; fi
        shim=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        pid_alive "$shim" "$dir" || continue
        log "killing container process $pid (shim $shim)"
        kill -KILL "$pid" 2>/dev/null || true
        shims+=("$shim")
    done < <(find "$dir/containerd/state" -name init.pid 2>/dev/null)
    for shim in "${shims[@]}"; do
        sleep 0.2
        if pid_alive "$shim" "$dir"; then
            log "stopping shim $shim"
            kill -KILL "$shim" 2>/dev/null || true
        fi
    done
}

# Unmount everything below DIR (overlay root filesystems, /dev/shm, network
# namespaces, volumes), deepest first.
unmount_below() {
    local dir=$1 mp
    while IFS= read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "could not unmount $mp"
    done < <(awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo |
        sed 's/\\040/ /g' | sort -r -u)
}

# Remove the iptables rules and chains kube-proxy created: `--cleanup`
# removes the service rules but keeps its canary and KUBE-MARK-* chains.
remove_proxy_rules() {
    "$BIN_DIR/kube-proxy" --cleanup --proxy-mode=iptables >/dev/null 2>&1 || true
    local table chain
    for table in filter nat mangle; do
        for chain in KUBE-PROXY-CANARY KUBE-MARK-DROP KUBE-MARK-MASQ; do
            iptables -w -t "$table" -n -L "$chain" >/dev/null 2>&1 || continue
            # Only if nothing jumps to it any more.
            if iptables -w -t "$table" -S 2>/dev/null | grep -qE -- "-j $chain( |$)"; then
                continue
            fi
            iptables -w -t "$table" -F "$chain" 2>/dev/null || true
            iptables -w -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

cmd_node_stop() {
    [[ $# -eq 1 ]] || usage
    [[ -d $1 ]] || return 0
    local dir i
    dir=$(cd "$1" && pwd -P)
    stop_pid node-watchdog "$dir"
    for ((i = ${#NODE_COMPONENTS[@]} - 1; i >= 1; i--)); do
        stop_pid "${NODE_COMPONENTS[i]}" "$dir"
    done
    if [[ -f $dir/containerd.pid ]] && pid_alive "$(<"$dir/containerd.pid")" "$dir"; then
        kill_containers "$dir"
    fi
    stop_pid containerd "$dir"
    stop_leftover_tasks "$dir"
    if [[ -f $dir/node/tokens.csv ]]; then
        remove_proxy_rules
    fi
    "$LCP" stop "$dir"
    unmount_below "$dir"
    if [[ -f $MARKER && $(<"$MARKER") == "$dir" ]]; then
        ip link del "$BRIDGE" 2>/dev/null || true
        restore_sysctls "$dir"
        forget_host_dirs "$dir"
        rm -f "$MARKER"
    fi
}

cmd_node_watch() {
    local owner=$1 dir=$2
    while process_running "$owner"; do
        sleep 1
    done
    log "owner process $owner exited; stopping the node cluster in $dir"
    cmd_node_stop "${dir%/}"
}

node_main() {
    [[ $# -ge 1 ]] || usage
    local cmd=$1
    shift
    case $cmd in
        start) cmd_node_start "$@" ;;
        stop) cmd_node_stop "$@" ;;
        env) cmd_env "$@" ;;
        free-net) free_node_net ;;
        __watch) cmd_node_watch "$@" ;;
        *) usage ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    node_main "$@"
    exit $?
fi
