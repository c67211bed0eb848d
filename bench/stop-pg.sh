# Sourced by the benchmarks that start PostgreSQL servers (bench/pg-suite.sh, bench/reads.sh,
# bench/pooling.sh).
#
# stop_pg DATA: a fast shutdown of the server the script started on DATA, by the pid in its
# postmaster.pid. What `runuser -u postgres -- postgres … &` gives as $! is runuser's pid, and a
# signal to runuser does not reliably reach the server: the servers outlived the scripts.
stop_pg() {
  local pid
  pid=$(head -1 "$1/postmaster.pid" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -INT "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
