#!/usr/bin/env bash
# Operator benchmark: converge N DatabasePortals (default 1000) on a private local control
# plane; prints the time and the operator's memory. Figures are recorded in bench/OPERATOR.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# N portals need 3N ClusterIPs; the local control plane's default range (/24) holds 254.
export DBPORTAL_LCP_SERVICE_CIDR=${DBPORTAL_LCP_SERVICE_CIDR:-10.96.0.0/16}
cargo build --release -p dbportal-operator --bin operator --example converge
exec target/release/examples/converge "${1:-1000}"
