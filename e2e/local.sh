#!/usr/bin/env bash
# Runs the end-to-end suite on the local single-node cluster (local-node.sh):
# what `.ci/run` calls.
#
#   e2e/local.sh [run] [--no-cargo] [--keep]   build (cached), start the node,
#                                              import the images, install the
#                                              operator from the chart, run
#                                              e2e/suite.sh; again with the
#                                              chart's single-replica values;
#                                              stop
#   e2e/local.sh up DIR [--no-cargo]           the same without the suite and
#                                              the stop (for benchmarks, by hand)
#   e2e/local.sh down DIR                      stop a node started by `up`
#                                              (also its suite's redis-servers)
#
#   --no-cargo  use the static binaries already built (build-images.sh --no-cargo)
#   --keep      leave the node running after `run` (stop it with `down DIR`)
#
# The operator is installed from the chart with the README's own commands
# (`helm install dbportal charts/dbportal -n dbportal-system --create-namespace`,
# `helm` being charts/bin/helm: Helm 4's library in the virtualenv charts/venv.sh
# makes) with the local images (pullPolicy Never). `run` runs the suite
# once per install: the chart's defaults (leader election, two replicas),
# then, after removing that install, `leaderElection=false, replicas=1`;
# `up` installs the defaults. Each suite prints its own `e2e result:` line.
#
# `run` cleans up after an earlier run that was killed: a node whose state
# directory is one of ours (/tmp/dbportal-e2e.*) is stopped first, with the
# redis-server processes its suite recorded. Needs root.
set -euo pipefail

E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly E2E
readonly REPO=${E2E%/e2e}
readonly MARKER=/run/dbportal-local-node
readonly STATE_PREFIX=${TMPDIR:-/tmp}/dbportal-e2e.
readonly PORTAL_IMAGE=dbportal/portal:dev
readonly OPERATOR_IMAGE=dbportal/operator:dev
readonly OPERATOR_NS=dbportal-system

log() { printf 'local.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '2,29s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }

# Kills the redis-servers a suite recorded in DIR (checked by command line).
kill_recorded_redis() {
    local dir=$1 pid
    [[ -f $dir/e2e-redis.pids ]] || return 0
    while IFS= read -r pid; do
        [[ $pid =~ ^[0-9]+$ ]] || continue
        if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -Eq '^redis-server 10\.[0-9]+\.0\.1:'; then
            log "killing redis-server $pid left by an earlier run"
            kill "$pid" 2>/dev/null || true
        fi
    done <"$dir/e2e-redis.pids"
    rm -f "$dir/e2e-redis.pids"
}

cmd_down() {
    local dir=$1
    [[ -d $dir ]] || return 0
    kill_recorded_redis "$dir"
    "$E2E/local-node.sh" stop "$dir"
}

# An earlier run that was killed may have left its node (the watchdog stops it
# when its owner dies, but not if the watchdog was killed too).
clean_stale() {
    local other d
    if [[ -f $MARKER ]]; then
        other=$(<"$MARKER")
        if [[ $other == "$STATE_PREFIX"* ]]; then
            log "stopping the node of an earlier run in $other"
            cmd_down "$other" || true
            rm -rf "$other"
        fi
        # Anything else is handled (or refused, if it is alive) by local-node.sh start.
    fi
    # State directories of killed runs whose node the owner watchdog already
    # stopped: their suite's redis-servers may still run.
    for d in "$STATE_PREFIX"*; do
        [[ -d $d && ! -f $MARKER ]] || continue
        log "cleaning up after an earlier run in $d"
        cmd_down "$d" >/dev/null 2>&1 || true
        rm -rf "$d"
    done
}

build() {
    local cargo=$1 t0
    t0=$(now_ms)
    "$E2E/local-control-plane.sh" build --node
    log "control plane and node binaries ready after $(($(now_ms) - t0)) ms"
    t0=$(now_ms)
    if [[ $cargo == 1 ]]; then
        "$E2E/build-images.sh"
    else
        "$E2E/build-images.sh" --no-cargo
    fi
    log "images built after $(($(now_ms) - t0)) ms"
}

# install_operator DIR [--set K=V...]: the chart installed with the README's commands (`helm
# install`, then `kubectl rollout status`; `helm` is charts/bin/helm, Helm 4's library), with
# the local images (pullPolicy Never) and VALUES.
install_operator() {
    local dir=$1 t0
    shift
    t0=$(now_ms)
    local images=(--set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}"
        --set image.pullPolicy=Never --set portalImage="$PORTAL_IMAGE")
    if ! (cd "$REPO" && PATH=$REPO/charts/bin:$DBPORTAL_K8S_BIN_DIR:$PATH \
        helm install dbportal charts/dbportal -n "$OPERATOR_NS" --create-namespace \
        "${images[@]}" "$@" >"$dir/helm-install.log" 2>&1); then
        cat "$dir/helm-install.log" >&2
        die "helm install failed"
    fi
    if ! "$DBPORTAL_K8S_BIN_DIR/kubectl" -n "$OPERATOR_NS" rollout status deployment/dbportal-operator \
        --timeout=120s >/dev/null; then
        "$DBPORTAL_K8S_BIN_DIR/kubectl" -n "$OPERATOR_NS" describe pods >&2 || true
        "$DBPORTAL_K8S_BIN_DIR/kubectl" -n "$OPERATOR_NS" logs -l app.kubernetes.io/name=dbportal,app.kubernetes.io/component=operator \
            --tail=50 >&2 || true
        die "the operator did not become available"
    fi
    local replicas
    replicas=$("$DBPORTAL_K8S_BIN_DIR/kubectl" -n "$OPERATOR_NS" get deployment/dbportal-operator \
        -o jsonpath='{.status.readyReplicas}')
    log "operator from the chart (${*:-defaults}): $replicas ready after $(($(now_ms) - t0)) ms"
}

# uninstall_operator DIR: the release removed with `helm uninstall`; its pods gone.
uninstall_operator() {
    local dir=$1 kubectl=$DBPORTAL_K8S_BIN_DIR/kubectl t0
    t0=$(now_ms)
    (cd "$REPO" && PATH=$REPO/charts/bin:$DBPORTAL_K8S_BIN_DIR:$PATH \
        helm uninstall dbportal -n "$OPERATOR_NS" --wait >/dev/null)
    "$kubectl" -n "$OPERATOR_NS" wait --for=delete pod \
        -l app.kubernetes.io/name=dbportal,app.kubernetes.io/component=operator \
        --timeout=60s >/dev/null 2>&1 || true
    log "operator removed after $(($(now_ms) - t0)) ms"
}

# up DIR: start the node in DIR, import the images, install the operator.
up() {
    local dir=$1 t0
    t0=$(now_ms)
    DBPORTAL_LCP_WATCH_PID=${DBPORTAL_LCP_WATCH_PID-$$} \
        "$E2E/local-node.sh" start "$dir" "$REPO/crds/databaseportal.yaml" >/dev/null
    log "node Ready after $(($(now_ms) - t0)) ms"
    t0=$(now_ms)
    "$E2E/build-images.sh" --no-cargo "$dir" 2>"$dir/images.log" ||
        { cat "$dir/images.log" >&2; die "building or importing the images failed"; }
    log "images imported after $(($(now_ms) - t0)) ms"
    eval "$("$E2E/local-node.sh" env "$dir")"
    install_operator "$dir"
}

cmd_run() {
    local cargo=1 keep=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --no-cargo) cargo=0 ;;
            --keep) keep=1 ;;
            *) usage ;;
        esac
        shift
    done
    [[ $(id -u) -eq 0 ]] || die "must run as root (the node needs a bridge, iptables, mounts)"
    local t0 dir rc=0
    t0=$(now_ms)
    build "$cargo"
    clean_stale
    dir=$(mktemp -d "${STATE_PREFIX}XXXXXX")
    if [[ $keep == 1 ]]; then
        # The node outlives this script: no owner watchdog.
        DBPORTAL_LCP_WATCH_PID="" up "$dir"
    else
        # shellcheck disable=SC2064 # expand dir now
        trap "log 'stopping the node'; cmd_down '$dir' >/dev/null 2>&1 || true; rm -rf '$dir'" EXIT
        trap 'exit 130' INT TERM
        up "$dir"
    fi
    eval "$("$E2E/local-node.sh" env "$dir")"
    local t1 install
    # The chart's defaults first (installed by `up`), then one replica without election.
    for install in defaults single; do
        if [[ $install == single ]]; then
            uninstall_operator "$dir"
            install_operator "$dir" --set leaderElection=false --set replicas=1
        fi
        log "suite with the operator installed from the chart: $install"
        t1=$(now_ms)
        DBPORTAL_E2E_PLATFORM=local \
            DBPORTAL_E2E_OPERATOR=in-cluster \
            DBPORTAL_E2E_OPERATOR_NAMESPACE=$OPERATOR_NS \
            DBPORTAL_PORTAL_IMAGE=$PORTAL_IMAGE \
            DBPORTAL_OPERATOR_IMAGE=$OPERATOR_IMAGE \
            DBPORTAL_E2E_STATE_DIR=$dir \
            "$E2E/suite.sh" || rc=$?
        log "suite ($install): $(($(now_ms) - t1)) ms"
    done
    log "build, node and both suites: $(($(now_ms) - t0)) ms"
    [[ $keep == 0 ]] || log "node kept running: KUBECONFIG=$dir/admin.kubeconfig; stop it with '$0 down $dir'"
    return "$rc"
}

main() {
    local cmd=${1:-run}
    case $cmd in
        run) [[ $# -eq 0 ]] || shift; cmd_run "$@" ;;
        --*) cmd_run "$@" ;;
        up)
            [[ $# -ge 2 ]] || usage
            [[ $(id -u) -eq 0 ]] || die "must run as root"
            local dir=$2 cargo=1
            [[ ${3:-} != --no-cargo ]] || cargo=0
            build "$cargo"
            clean_stale
            mkdir -p "$dir"
            # No watchdog: the node outlives this script until `down`.
            DBPORTAL_LCP_WATCH_PID="" up "$(cd "$dir" && pwd -P)"
            ;;
        down) [[ $# -eq 2 ]] || usage; cmd_down "$2" ;;
        *) usage ;;
    esac
}

main "$@"
