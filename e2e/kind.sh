#!/usr/bin/env bash
# Runs dbportal's end-to-end suite on a kind cluster (users, public CI).
#
#   e2e/kind.sh [all|up|install|test|down]
#
#   up       create the kind cluster, build the images from the Dockerfile
#            (and the suite's toolbox from e2e/toolbox.Dockerfile) and load
#            them into the cluster (kind load docker-image)
#   install  install (or upgrade) the chart from charts/dbportal
#   test     run the suite against the cluster
#   down     delete the cluster
#   all      up, install, test, then down (default; KEEP_CLUSTER=1 keeps it)
#
# Needs docker, kind, kubectl and helm in PATH. Environment:
#   KIND_CLUSTER_NAME   cluster name (default dbportal-e2e)
#   KIND_NODE_IMAGE     node image, e.g. kindest/node:v1.30.0 (default: kind's)
#   DBPORTAL_E2E_SUITE  the suite command (default e2e/suite.sh)
#   KEEP_CLUSTER        1: `all` does not delete the cluster
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO_DIR
readonly CLUSTER=${KIND_CLUSTER_NAME:-dbportal-e2e}
readonly NAMESPACE=dbportal-system
readonly RELEASE=dbportal
readonly OPERATOR_IMAGE=dbportal/operator:dev
readonly PORTAL_IMAGE=dbportal/portal:dev
readonly TOOLBOX_IMAGE=dbportal/toolbox:dev
KUBECONFIG_FILE=${KIND_KUBECONFIG:-$REPO_DIR/target/kind-$CLUSTER.kubeconfig}
readonly KUBECONFIG_FILE

log() { printf 'kind.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '2,18s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
}

cluster_exists() { kind get clusters 2>/dev/null | grep -qxF "$CLUSTER"; }

cmd_up() {
    need docker kind kubectl
    mkdir -p "$(dirname "$KUBECONFIG_FILE")"
    if cluster_exists; then
        log "kind cluster $CLUSTER exists; reusing it"
    else
        local args=(--name "$CLUSTER" --wait 180s)
        [[ -z ${KIND_NODE_IMAGE:-} ]] || args+=(--image "$KIND_NODE_IMAGE")
        kind create cluster "${args[@]}"
    fi
    kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"

    log "building $PORTAL_IMAGE and $OPERATOR_IMAGE from the Dockerfile"
    DOCKER_BUILDKIT=1 docker build --target portal -t "$PORTAL_IMAGE" "$REPO_DIR"
    DOCKER_BUILDKIT=1 docker build --target operator -t "$OPERATOR_IMAGE" "$REPO_DIR"
    DOCKER_BUILDKIT=1 docker build -f "$REPO_DIR/e2e/toolbox.Dockerfile" -t "$TOOLBOX_IMAGE" \
        "$REPO_DIR/e2e"
    kind load docker-image --name "$CLUSTER" "$PORTAL_IMAGE" "$OPERATOR_IMAGE" "$TOOLBOX_IMAGE"
}

cmd_install() {
    need helm kubectl
    [[ -f $KUBECONFIG_FILE ]] || die "no kubeconfig at $KUBECONFIG_FILE; run '$0 up' first"
    # The images are loaded into the node: never pull them.
    helm upgrade --install "$RELEASE" "$REPO_DIR/charts/dbportal" \
        --kubeconfig "$KUBECONFIG_FILE" \
        --namespace "$NAMESPACE" --create-namespace \
        --set image.repository="${OPERATOR_IMAGE%:*}" \
        --set image.tag="${OPERATOR_IMAGE##*:}" \
        --set image.pullPolicy=Never \
        --set portalImage="$PORTAL_IMAGE" \
        --wait --timeout 5m
    kubectl --kubeconfig "$KUBECONFIG_FILE" -n "$NAMESPACE" wait \
        --for=condition=Available deployment --all --timeout=3m
}

cmd_test() {
    [[ -f $KUBECONFIG_FILE ]] || die "no kubeconfig at $KUBECONFIG_FILE; run '$0 up' first"
    local suite=${DBPORTAL_E2E_SUITE:-$REPO_DIR/e2e/suite.sh}
    [[ -x ${suite%% *} ]] || die "suite command $suite not found (set DBPORTAL_E2E_SUITE)"
    # The suite runs against whatever KUBECONFIG points to; these say what
    # kind of cluster it is and which images and operator are in place. The
    # databases run as pods of the toolbox image (the host cannot reach pods).
    # shellcheck disable=SC2086 # DBPORTAL_E2E_SUITE may carry arguments
    KUBECONFIG=$KUBECONFIG_FILE \
        DBPORTAL_E2E_PLATFORM=kind \
        DBPORTAL_E2E_OPERATOR=in-cluster \
        DBPORTAL_E2E_OPERATOR_NAMESPACE=$NAMESPACE \
        DBPORTAL_PORTAL_IMAGE=$PORTAL_IMAGE \
        DBPORTAL_OPERATOR_IMAGE=$OPERATOR_IMAGE \
        DBPORTAL_E2E_DB=pod \
        DBPORTAL_E2E_TOOLBOX_IMAGE=$TOOLBOX_IMAGE \
        DBPORTAL_E2E_DB_IMAGE=$TOOLBOX_IMAGE \
        $suite
}

cmd_down() {
    need kind
    if cluster_exists; then
        kind delete cluster --name "$CLUSTER"
    fi
    rm -f "$KUBECONFIG_FILE"
}

# Collects cluster logs for CI artifacts (kind export logs).
cmd_logs() {
    need kind
    local out=${1:-$REPO_DIR/target/kind-logs}
    cluster_exists && kind export logs --name "$CLUSTER" "$out"
}

cmd_all() {
    local rc=0
    cmd_up
    cmd_install
    cmd_test || rc=$?
    if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
        log "keeping cluster $CLUSTER (KUBECONFIG=$KUBECONFIG_FILE)"
    else
        cmd_down
    fi
    return "$rc"
}

main() {
    local cmd=${1:-all}
    [[ $# -eq 0 ]] || shift
    case $cmd in
        all) cmd_all ;;
        up) cmd_up ;;
        install) cmd_install ;;
        test) cmd_test ;;
        down) cmd_down ;;
        logs) cmd_logs "$@" ;;
        *) usage ;;
    esac
}

main "$@"
