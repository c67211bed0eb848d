#!/usr/bin/env python3
"""HAProxy, a second identical HAProxy (the control) and the portal, side by side in front of
one redis-server, each measured by redis-benchmark SET/GET -c 50 at pipeline P in turn, the
order rotating, REPS rotations (defaults: 10, pipeline 1). Prints every figure, then for the
portal and the control: in how many figures it was at least as fast as the first HAProxy,
with a p99 at most as high, and the median ratio. Loopback only; every process it starts is
stopped by PID at the end.

    bench/rotations.py [REPS] [P]

Builds the release portal first unless PORTAL_BIN names one. Figures: bench/RESULTS.md.
"""

import sys

import dataplane as bench


def main():
    bench.build_portal()
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    pipeline = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    _, redis_port = bench.start_redis()
    kinds = ["haproxy", "haproxy-b", "portal"]
    targets = {kind: bench.start_proxy(kind, redis_port) for kind in kinds}
    figures = {}  # (rotation, kind) -> {test: (rps, p50, p99)}
    for rep in range(reps):
        for kind in kinds[rep % 3:] + kinds[:rep % 3]:
            figures[(rep, kind)] = bench.redis_benchmark(targets[kind][1], pipeline)
            print(f"{rep + 1:>2} {kind:9} " + "  ".join(
                f"{test} {rps:>9,.0f} p99 {p99:.3f}" for test, (rps, _, p99) in figures[(rep, kind)].items()),
                flush=True)
    print()
    for kind in kinds[1:]:
        for test in ("SET", "GET"):
            ratio, _, _, faster, tail = bench.pairs([figures[(r, "haproxy")][test] for r in range(reps)],
                                                    [figures[(r, kind)][test] for r in range(reps)])
            print(f"{kind:9} {test} -P {pipeline}: at least as fast {faster}/{reps}, "
                  f"p99 at most as high {tail}/{reps}, median ratio {ratio:.2f}")


if __name__ == "__main__":
    try:
        main()
    finally:
        bench.cleanup()
