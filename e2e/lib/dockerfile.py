#!/usr/bin/env python3
"""The Dockerfile's runtime stages as e2e/build-images.sh needs them, and the check that an
image build-images.sh wrote holds what `docker build --target STAGE` would.

    dockerfile.py config DOCKERFILE STAGE [ARG=VALUE...]
        the stage's image config as JSON: Labels, Env, WorkingDir, User, Entrypoint
    dockerfile.py check DOCKERFILE STAGE ARCHIVE ROOTFS [ARG=VALUE...]
        exit 1 naming every difference between the docker-archive ARCHIVE and the stage

`check` reads the stage and requires the shape both builds rely on: FROM scratch, one
`COPY --from=builder /out/STAGE/ /` of the tree e2e/lib/image-rootfs.sh lays out (the
builder stage must run that script into /out), then only ARG, LABEL, ENV, WORKDIR, USER and
ENTRYPOINT. Then it compares the archive with the stage: the image config (labels, env,
working directory, user, entrypoint) and the layers' files (every path, type, mode, owner
root, and the bytes of each file) with ROOTFS, the tree the stage copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
import sys
import tarfile

RUNTIME_INSTRUCTIONS = {"ARG", "LABEL", "ENV", "WORKDIR", "USER", "ENTRYPOINT", "COPY"}


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line:
                word, _, rest = line.partition(" ")
                out.append((word.upper(), rest.strip()))
    return out


def stages(path: str) -> dict[str, list[tuple[str, str]]]:
    by_name: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in instructions(path):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]
            current = by_name.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return by_name


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text
    )


def pairs(rest: str, args: dict[str, str]) -> dict[str, str]:
    out = {}
    for item in shlex.split(rest):
        key, _, value = item.partition("=")
        out[key] = substitute(value, args)
    return out


def config(path: str, stage: str, overrides: dict[str, str]) -> dict:
    """The image config `docker build --target STAGE` gives, and the stage's problems."""
    body = stages(path).get(stage)
    if body is None:
        raise SystemExit(f"{path}: no stage {stage!r}")
    args: dict[str, str] = {}
    cfg: dict = {"Labels": {}, "Env": [], "WorkingDir": "", "User": "", "Entrypoint": None}
    problems, copies = [], []
    if body[0][1].split()[0] != "scratch":
        problems.append(f"stage {stage} is not FROM scratch: FROM {body[0][1]}")
    for word, rest in body[1:]:
        if word not in RUNTIME_INSTRUCTIONS:
            problems.append(f"stage {stage}: {word} changes the image beyond the copied tree")
        elif word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = overrides.get(key, default)
        elif word == "LABEL":
            cfg["Labels"].update(pairs(rest, args))
        elif word == "ENV":
            for key, value in pairs(rest, args).items():
                cfg["Env"] = [e for e in cfg["Env"] if not e.startswith(key + "=")]
                cfg["Env"].append(f"{key}={value}")
        elif word == "WORKDIR":
            cfg["WorkingDir"] = substitute(rest, args)
        elif word == "USER":
            cfg["User"] = substitute(rest, args)
        elif word == "ENTRYPOINT":
            cfg["Entrypoint"] = json.loads(rest)
        elif word == "COPY":
            copies.append(rest.split())
    if copies != [["--from=builder", f"/out/{stage}/", "/"]]:
        problems.append(
            f"stage {stage} must copy exactly --from=builder /out/{stage}/ /, copies {copies}"
        )
    builder = " ".join(rest for word, rest in stages(path).get("builder", []) if word == "RUN")
    if "e2e/lib/image-rootfs.sh /out" not in builder:
        problems.append("the builder stage does not run e2e/lib/image-rootfs.sh /out")
    return {"config": cfg, "problems": problems}


def archive_files(archive: str) -> tuple[dict, dict[str, tuple]]:
    """The image config and {path: (type, mode, uid, gid, sha256)} of a docker-archive."""
    files: dict[str, tuple] = {}
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        image = json.load(t.extractfile(manifest["Config"]))
        for layer in manifest["Layers"]:
            with tarfile.open(fileobj=t.extractfile(layer)) as lt:
                for m in lt.getmembers():
                    digest = ""
                    if m.isfile():
                        digest = hashlib.sha256(lt.extractfile(m).read()).hexdigest()
                    kind = "dir" if m.isdir() else "file" if m.isfile() else "other"
                    files[m.name.strip("/").removeprefix("./")] = (
                        kind, oct(m.mode & 0o7777), m.uid, m.gid, digest
                    )
    return image, files


def tree_files(root: str) -> dict[str, tuple]:
    """The same for the tree COPY takes, as root owns it in the builder."""
    files: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISDIR(st.st_mode):
                files[rel] = ("dir", oct(st.st_mode & 0o7777), 0, 0, "")
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                files[rel] = ("file", oct(st.st_mode & 0o7777), 0, 0, digest)
            else:
                files[rel] = ("other", oct(st.st_mode & 0o7777), 0, 0, "")
    return files


def check(path: str, stage: str, archive: str, root: str, overrides: dict[str, str]) -> list[str]:
    wanted = config(path, stage, overrides)
    problems = list(wanted["problems"])
    image, have = archive_files(archive)
    got = image.get("config", {})
    empty = {"Labels": {}, "Env": [], "WorkingDir": "", "User": "", "Entrypoint": None}
    for key, value in wanted["config"].items():
        if (got.get(key) or empty[key]) != (value or empty[key]):
            problems.append(f"config {key}: the image has {got.get(key)!r}, the Dockerfile {value!r}")
    expected = tree_files(root)
    for name in sorted(set(have) | set(expected)):
        if have.get(name) != expected.get(name):
            problems.append(f"/{name}: the image has {have.get(name)}, the stage {expected.get(name)}")
    return problems


def overrides_of(items: list[str]) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in items)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "config":
        result = config(argv[1], argv[2], overrides_of(argv[3:]))
        for p in result["problems"]:
            print(f"dockerfile.py: {p}", file=sys.stderr)
        print(json.dumps(result["config"], sort_keys=True))
        return 1 if result["problems"] else 0
    if len(argv) >= 5 and argv[0] == "check":
        problems = check(argv[1], argv[2], argv[3], argv[4], overrides_of(argv[5:]))
        for p in problems:
            print(f"dockerfile.py: {argv[3]}: {p}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
