#!/usr/bin/env bash
# The operator against the API server's contract floor, alternated in one run: this machine's
# speed drifts by a third from one quarter hour to the next, so only figures taken side by
# side compare. REPS times: the floor (bench/apiserver_ceiling.sh --floor: every write the
# contract asks for, no operator), then the operator converging the same N DatabasePortals
# (bench/operator.sh); prints both, their ratio, and medians. Full outputs in $OUT (a temp dir).
#
#   bench/operator_ratio.sh [N] [REPS]      (defaults: 1000, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
reps=${2:-3}
export DBPORTAL_LCP_SERVICE_CIDR=${DBPORTAL_LCP_SERVICE_CIDR:-10.96.0.0/16}
cargo build --release -p dbportal-operator --bin operator --example converge
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/dbportal-operator-ratio.XXXXXX")}
floors=()
operators=()
for rep in $(seq 1 "$reps"); do
    DBPORTAL_OPERATOR_BIN=target/release/operator bash bench/apiserver_ceiling.sh --floor "$n" 16 \
        >"$out/floor-$rep.log" 2>&1
    floor=$(sed -n 's/.* in flight: \([0-9.]*\) s .*/\1/p' "$out/floor-$rep.log")
    target/release/examples/converge "$n" >"$out/operator-$rep.log" 2>&1
    operator=$(sed -n 's/^converged in: *\([0-9.]*\) s.*/\1/p' "$out/operator-$rep.log")
    rss=$(sed -n 's/^operator RSS peak: *\([0-9.]*\) MiB.*/\1/p' "$out/operator-$rep.log")
    [[ -n $floor && -n $operator ]] || { echo "rep $rep failed: see $out" >&2; exit 1; }
    floors+=("$floor")
    operators+=("$operator")
    printf 'rep %d: floor %6.1f s, operator %6.1f s (RSS peak %s MiB), ratio %.2f, load %s\n' \
        "$rep" "$floor" "$operator" "$rss" "$(awk "BEGIN {print $operator / $floor}")" \
        "$(cut -d' ' -f1 /proc/loadavg)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
f=$(median "${floors[@]}")
o=$(median "${operators[@]}")
printf 'median of %d: floor %.1f s, operator %.1f s, ratio %.2f (%d DatabasePortals; logs in %s)\n' \
    "$reps" "$f" "$o" "$(awk "BEGIN {print $o / $f}")" "$n" "$out"
