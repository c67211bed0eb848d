#!/usr/bin/env python3
"""Keeps the build cache that outlives each clone ($CARGO_TARGET_DIR) from growing without
bound: every build with other flags or other sources leaves its test executables (hundreds
of MB each, with debug info) and its incremental state beside the current ones, and nothing
removes them. For each name, the newest test executable in `<profile>/deps` and the newest
incremental directory are kept, and the older ones removed once a day old (a library's unit
tests and its binary share a name: both stay while either is rebuilt daily, and a removed
one that is still current is only linked again). Prints what it freed.

Usage: prune-cache.py TARGET_DIR   (the directory holding debug/, release/, <triple>/...)
"""

import os
import shutil
import sys
import time


def candidates(directory: str, want_dirs: bool):
    """Entries of `directory` named NAME-HASH, grouped by NAME."""
    groups: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return groups
    for name in names:
        path = os.path.join(directory, name)
        base, sep, tail = name.rpartition("-")
        if not sep or not tail.isalnum():
            continue
        if want_dirs:
            if not os.path.isdir(path):
                continue
        elif "." in name or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        groups.setdefault(base, []).append(path)
    return groups


def size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def main() -> None:
    target = sys.argv[1]
    recent = time.time() - 86400
    freed = 0
    removed = 0
    for root, dirs, _ in os.walk(target):
        for d in list(dirs):
            if d not in ("deps", "incremental"):
                continue
            path = os.path.join(root, d)
            for paths in candidates(path, d == "incremental").values():
                paths.sort(key=os.path.getmtime, reverse=True)
                for old in paths[1:]:
                    if os.path.getmtime(old) > recent:
                        continue
                    freed += size(old)
                    removed += 1
                    if os.path.isdir(old):
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.remove(old)
        # deps/ and incremental/ hold no further profiles.
        dirs[:] = [d for d in dirs if d not in ("deps", "incremental", "build", ".fingerprint")]
    print(f"build cache: removed {removed} superseded test executables and incremental "
          f"directories, {freed / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
