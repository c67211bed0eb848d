#!/usr/bin/env bash
# Read-only listener benchmark: a PostgreSQL 15 primary with two streaming standbys; pgbench -S
# direct to one standby, then through the portal's read-only listener (readOnly, round robin
# over both standbys). TPS, p50/p99 latency, errors, and how the transactions spread: each
# server's committed transactions during the run (pg_stat_database.xact_commit, which standbys
# count too), and the portal's CPU seconds per 1,000 transactions.
#   bench/reads.sh                                  # 32 clients, 15 s per run
#   CLIENTS=8 SECONDS_PER_RUN=5 bench/reads.sh      # quicker
#   PROFILE=debug bench/reads.sh                    # the debug build (no release build)
# Needs: postgresql-15, pgbench, curl, a Rust toolchain. Prints figures (Markdown); it is not a
# test, but it exits non-zero when a run has errors or the sessions did not spread evenly over
# both standbys.
# Run as root (PostgreSQL runs as the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-32}
SECS=${SECONDS_PER_RUN:-15}
THREADS=${THREADS:-2}
PROFILE=${PROFILE:-release}
PG_BIN=/usr/lib/postgresql/15/bin
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if [ "$PROFILE" = release ]; then
  cargo build --release -q -p dbportal-portal --bin portal
else
  cargo build -q -p dbportal-portal --bin portal
fi
PORTAL_BIN=$(find "$CARGO_TARGET_DIR" -path "*/$PROFILE/portal" -type f -perm -u+x | head -1)

work=$(mktemp -d /tmp/dbportal-bench-reads.XXXXXX)
chown postgres:postgres "$work"
pids=()
source bench/stop-pg.sh   # stop_pg (the working directory is the repository)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for data in "$work"/p[0-9]; do stop_pg "$data"; done
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { runuser -u postgres -- "$@"; }
export PGPASSWORD=benchpw
sql() { psql -h 127.0.0.1 -p "$1" -U postgres -XAtqc "$2" postgres; }
wait_sql() {
  for _ in $(seq 1 150); do sql "$1" 'select 1' >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "PostgreSQL on $1 did not start" >&2; return 1
}
start_pg() { # data port
  as_pg "$PG_BIN/postgres" -D "$1" -p "$2" -k "$work" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c max_connections=$((CLIENTS + 50)) -c shared_buffers=128MB \
    >"$1.log" 2>&1 &
  pids+=("$!")
  wait_sql "$2"
}

# The primary, with pgbench's tables; two standbys from base backups.
P0=$(free_port); P1=$(free_port); P2=$(free_port)
echo benchpw > "$work/pw"; chown postgres "$work/pw"
as_pg "$PG_BIN/initdb" -D "$work/p0" -U postgres --auth=scram-sha-256 --pwfile="$work/pw" --no-sync >/dev/null
start_pg "$work/p0" "$P0"
pgbench -h 127.0.0.1 -p "$P0" -U postgres -i -s 10 -q postgres >/dev/null 2>&1
for s in 1 2; do
  port_var=P$s
  as_pg env PGPASSWORD=benchpw "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$P0" -U postgres \
    -D "$work/p$s" -R -X stream --no-sync
  start_pg "$work/p$s" "${!port_var}"
done

# The portal: the main listener and the read-only one, round robin over the standbys.
PPORT=$(free_port); RPORT=$(free_port); PADMIN=$(free_port)
cat > "$work/portal.yaml" <<EOF
engine: postgres
listen: 127.0.0.1:$PPORT
admin: 127.0.0.1:$PADMIN
tls: {mode: disabled}
limits: {maxConnections: 20000, maxNegotiating: 20000}
healthCheck: {interval: 500ms, credentials: {username: postgres, password: benchpw}}
readOnly: {listen: "127.0.0.1:$RPORT", maxLag: 10s, routing: roundrobin}
backends:
  - {name: pg0, address: "127.0.0.1:$P0"}
  - {name: pg1, address: "127.0.0.1:$P1"}
  - {name: pg2, address: "127.0.0.1:$P2"}
EOF
RUST_LOG=warn "$PORTAL_BIN" --config "$work/portal.yaml" >"$work/portal.log" 2>&1 &
portal_pid=$!
pids+=("$portal_pid")
serving=""
for _ in $(seq 1 200); do
  serving=$(curl -sf "http://127.0.0.1:$PADMIN/status" 2>/dev/null |
    python3 -c 'import json,sys; print(",".join(json.load(sys.stdin)["readOnly"]["serving"]))' 2>/dev/null || true)
  [ "$serving" = "pg1,pg2" ] && break
  sleep 0.1
done
[ "$serving" = "pg1,pg2" ] || { echo "the standbys do not serve reads: '$serving'" >&2; exit 1; }

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
sessions() {
  sql "$1" "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()"
}
commits() { sql "$1" "select xact_commit from pg_stat_database where datname = 'postgres'"; }
bad=0

run() { # name port proxy_pid
  local name=$1 port=$2 pid=$3 logdir="$work/log-$1"
  mkdir -p "$logdir"
  local before=() after=() p
  for p in "$P0" "$P1" "$P2"; do before+=("$(commits "$p")"); done
  local c0=0; [ "$pid" != - ] && c0=$(cpu "$pid")
  # Sessions per standby, half-way through.
  ( sleep $((SECS / 2 + 1)); for p in "$P1" "$P2"; do sessions "$p"; done | paste -sd/ > "$logdir/sessions" ) &
  local sampler=$!
  local out
  out=$(cd "$logdir" && pgbench -h 127.0.0.1 -p "$port" -U postgres -S -n \
        -c "$CLIENTS" -j "$THREADS" -T "$SECS" -l postgres 2>&1) || true
  wait "$sampler" || true
  local c1=0; [ "$pid" != - ] && c1=$(cpu "$pid")
  # Statistics reach pg_stat_database when a backend ends or every 1 s or so.
  sleep 1.5
  for p in "$P0" "$P1" "$P2"; do after+=("$(commits "$p")"); done
  local tps txs failed aborted
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  txs=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' | head -1)
  aborted=$(echo "$out" | grep -c 'aborted in command' || true)
  if [ -z "$tps" ] || [ -z "$txs" ] || [ "$txs" = 0 ]; then
    printf '| %s | failed: %s | | | | | | | | |\n' "$name" "$(echo "$out" | grep -m1 -i error || echo 'no result')"
    bad=1
    return
  fi
  local pct cpu_per spread=()
  pct=$(cat "$logdir"/pgbench_log.* | awk '{print $3}' | sort -n |
    awk '{a[NR]=$1} END {printf "%.2f | %.2f", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
  if [ "$pid" = - ]; then cpu_per="—"; else
    cpu_per=$(awk -v a="$c0" -v b="$c1" -v t="$tick" -v n="$txs" 'BEGIN {printf "%.3f", (b - a) / t / n * 1000}')
  fi
  for i in 0 1 2; do spread+=("$((after[i] - before[i]))"); done
  printf '| %s | %.0f | %s | %s | %s | %s | %s | %s | %s failed, %s clients aborted |\n' "$name" "$tps" "$pct" \
    "$(cat "$logdir/sessions")" "${spread[0]}" "${spread[1]}" "${spread[2]}" "$cpu_per" "${failed:-0}" "$aborted"
  [ "${failed:-0}" = 0 ] && [ "$aborted" = 0 ] || bad=1
  if [ "$name" = read-only ]; then
    # Sessions spread evenly over both standbys (how many transactions each runs then depends
    # on how fast each server is on a shared machine), and both took reads.
    local s1 s2
    IFS=/ read -r s1 s2 < "$logdir/sessions"
    awk -v a="$s1" -v b="$s2" -v c="$CLIENTS" -v x="${spread[1]}" -v y="${spread[2]}" -v n="$txs" \
      'BEGIN {d = a - b; exit !(a + b == c && d <= 1 && d >= -1 && x > n / 10 && y > n / 10)}' ||
      { echo "reads did not spread: sessions $s1/$s2, transactions ${spread[*]}" >&2; bad=1; }
  fi
}

echo "## Read-only listener: pgbench -S, $CLIENTS clients, ${SECS}s per run, plaintext"
echo
echo "$(nproc) cores; PostgreSQL 15, a primary and two streaming standbys; the portal ($PROFILE build)."
echo "Transactions per server: committed transactions during the run (pg_stat_database)."
echo
echo "| path | TPS | p50 ms | p99 ms | sessions on standby 1/2 | tx on primary | tx on standby 1 | tx on standby 2 | portal CPU s / 1,000 tx | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|"
run "direct to standby 1" "$P1" -
run read-only "$RPORT" "$portal_pid"
echo
exit "$bad"
