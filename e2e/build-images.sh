#!/usr/bin/env bash
# Builds dbportal's container images FROM scratch, without a registry or a
# container engine, and imports them into the local node's containerd.
#
#   build-images.sh [--only LIST] [--no-cargo] [--dynamic] [DIR]
#
#   LIST       comma-separated subset of pause,portal,operator,toolbox (default: all)
#   --no-cargo use the binaries already in the target directory
#   --dynamic  use `cargo build --release` binaries (target/release, shared
#              with other release builds) plus the shared libraries they load,
#              instead of a separate static build
#   DIR        state directory of a node started by local-node.sh: the images
#              are imported into its containerd (namespace k8s.io)
#
# Images (docker-archive tarballs, cached in $CACHE/images/):
#   dbportal/pause:dev     Kubernetes' pause.c, gcc -static (pod sandbox image)
#   dbportal/portal:dev    the portal binary, statically linked
#   dbportal/operator:dev  the operator binary, statically linked
#   dbportal/toolbox:dev   test clients for pods: busybox (static), curl and
#                          redis-cli with the shared libraries they load
# The portal and operator images are what the Dockerfile's runtime stages
# hold: e2e/lib/image-rootfs.sh (which the Dockerfile's builder runs too)
# builds and lays out their files; their labels, env, working directory,
# user and entrypoint are read from the Dockerfile; and e2e/lib/dockerfile.py
# checks each image written against its stage (exit 1 on any difference).
# Label arguments: DBPORTAL_IMAGE_VERSION, DBPORTAL_IMAGE_REVISION (the
# Dockerfile's VERSION and REVISION; default: its defaults).
set -euo pipefail

PROG=$(basename "$0")
readonly PROG
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly E2E_DIR
readonly REPO_DIR=${E2E_DIR%/e2e}
readonly CACHE_ROOT=${DBPORTAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbportal}
readonly IMAGE_DIR=$CACHE_ROOT/images
readonly NONROOT=65532:65532

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '2,26s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }

# apt_install PACKAGE...: install Debian packages (package lists refreshed
# if the first attempt fails, e.g. on a fresh machine).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "$@" >&2; }
}

# write_image OUT REF ENTRYPOINT_JSON USER DEST=SRC:MODE...
# Writes a single-layer image as a `docker save` archive (what
# `ctr images import` and `docker load` read). Files are root-owned with
# mtime 0, so the same inputs give the same image ID.
write_image() {
    python3 - "$@" <<'PYEOF'
import hashlib, io, json, os, sys, tarfile

out, ref, entrypoint, user = sys.argv[1:5]
files = sys.argv[5:]

def info(name, kind, mode, size=0):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti

layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as t:
    dirs = set()
    def add_dir(d, mode=0o755):
        if d and d not in dirs:
            add_dir(os.path.dirname(d))
            dirs.add(d)
            t.addfile(info(d, tarfile.DIRTYPE, mode))
    for spec in files:
        dest, rest = spec.split("=", 1)
        src, mode = rest.rsplit(":", 1)
        dest = dest.strip("/")
        if src == "DIR":
            add_dir(dest, int(mode, 8))
            continue
        add_dir(os.path.dirname(dest))
        with open(src, "rb") as f:
            t.addfile(info(dest, tarfile.REGTYPE, int(mode, 8), os.path.getsize(src)), f)
data = layer.getvalue()
diff_id = hashlib.sha256(data).hexdigest()

epoch = "1970-01-01T00:00:00Z"
image_config = {"Entrypoint": json.loads(entrypoint), "Env": ["PATH=/"], "WorkingDir": "/"}
# The Dockerfile stage's config, when this image is one of its runtime stages.
image_config.update(json.loads(os.environ.get("IMAGE_CONFIG") or "{}"))
config = {
    "architecture": "amd64",
    "os": "linux",
    "created": epoch,
    "config": image_config,
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
    "history": [{"created": epoch, "created_by": "e2e/build-images.sh"}],
}
if user:
    config["config"]["User"] = user
config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
config_id = hashlib.sha256(config_bytes).hexdigest()
manifest = [{"Config": config_id + ".json", "RepoTags": [ref], "Layers": [diff_id + "/layer.tar"]}]

tmp = out + ".tmp"
with tarfile.open(tmp, mode="w", format=tarfile.GNU_FORMAT) as t:
    def put(name, payload):
        t.addfile(info(name, tarfile.REGTYPE, 0o644, len(payload)), io.BytesIO(payload))
    t.addfile(info(diff_id, tarfile.DIRTYPE, 0o755))
    put(diff_id + "/layer.tar", data)
    put(config_id + ".json", config_bytes)
    put("manifest.json", json.dumps(manifest).encode())
    put("repositories", json.dumps({ref.rsplit(":", 1)[0]: {ref.rsplit(":", 1)[1]: diff_id}}).encode())
os.replace(tmp, out)
print("sha256:" + config_id)
PYEOF
}

# is_static FILE: true if FILE is an ELF executable without a program
# interpreter (static or static-pie), i.e. it runs in an empty image.
is_static() {
    python3 - "$1" <<'PYEOF'
import struct, sys
with open(sys.argv[1], "rb") as f:
    elf = f.read(64)
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        sys.exit(1)
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if struct.unpack("<I", f.read(4))[0] == 3:  # PT_INTERP
            sys.exit(1)
PYEOF
}

build_pause() {
    local k8s_src src bin=$IMAGE_DIR/pause
    k8s_src=$(dirname "$("$E2E_DIR/local-control-plane.sh" bin-dir)")/src
    src=$k8s_src/build/pause/linux/pause.c
    [[ -f $src ]] || die "$src missing; run 'e2e/local-control-plane.sh build --node' first"
    if [[ ! -x $bin || $src -nt $bin ]]; then
        command -v gcc >/dev/null || die "gcc is needed for the pause image (apt-get install gcc libc6-dev)"
        gcc -Os -static -Wall -Werror -DVERSION=v3.2-dbportal -o "$bin.tmp" "$src"
        strip "$bin.tmp" 2>/dev/null || true
        mv -f "$bin.tmp" "$bin"
    fi
    write_image "$IMAGE_DIR/pause.tar" dbportal/pause:dev '["/pause"]' "" \
        "pause=$bin:0755" >/dev/null
}

# CA bundle for outgoing TLS (rustls-native-certs reads /etc/ssl/certs).
ca_bundle() {
    local f=/etc/ssl/certs/ca-certificates.crt
    if [[ ! -f $f ]]; then
        log "installing ca-certificates"
        apt_install ca-certificates
    fi
    echo "$f"
}

cargo_build() {
    if [[ $DYNAMIC -eq 1 ]]; then
        log "cargo build --release"
        (cd "$REPO_DIR" &&
            cargo build --release --locked -p dbportal-portal -p dbportal-operator >&2)
        return
    fi
    log "cargo build (static, as the Dockerfile's builder: e2e/lib/image-rootfs.sh)"
    bash "$E2E_DIR/lib/image-rootfs.sh" "$IMAGE_DIR/rootfs"
}

# The Dockerfile's runtime stage NAME as an image config (JSON).
stage_config() {
    python3 "$E2E_DIR/lib/dockerfile.py" config "$REPO_DIR/Dockerfile" "$1" "${LABEL_ARGS[@]}"
}

build_rust_image() {
    local name=$1 target_dir bin libs=()
    target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
    if [[ $DYNAMIC -eq 1 ]]; then
        bin=$target_dir/release/$name
        [[ -x $bin ]] || die "$bin missing (run without --no-cargo)"
        # Snapshot: other builds may replace the file at any time.
        cp "$bin" "$IMAGE_DIR/$name.bin"
        bin=$IMAGE_DIR/$name.bin
        if ! is_static "$bin"; then
            mapfile -t libs < <(shared_object_specs "$bin" | grep -v "^${bin#/}=")
        fi
        IMAGE_CONFIG=$(stage_config "$name") write_image "$IMAGE_DIR/$name.tar" \
            "dbportal/$name:dev" "[\"/$name\"]" "$NONROOT" \
            "$name=$bin:0755" "${libs[@]}" \
            "etc/ssl/certs/ca-certificates.crt=$(ca_bundle):0644" "tmp=DIR:1777" >/dev/null
        rm -f "$IMAGE_DIR/$name.bin"
        return
    fi
    # The tree the Dockerfile's stage copies, file by file.
    local root=$IMAGE_DIR/rootfs/$name specs=()
    [[ -x $root/$name ]] || bash "$E2E_DIR/lib/image-rootfs.sh" --no-cargo "$IMAGE_DIR/rootfs"
    mapfile -t specs < <(cd "$root" && find . -mindepth 1 | sort | while IFS= read -r f; do
        f=${f#./}
        if [[ -d $f ]]; then
            printf '%s=DIR:%s\n' "$f" "$(stat -c %a "$f")"
        else
            printf '%s=%s:%s\n' "$f" "$root/$f" "$(stat -c %a "$f")"
        fi
    done)
    IMAGE_CONFIG=$(stage_config "$name") write_image "$IMAGE_DIR/$name.tar" \
        "dbportal/$name:dev" "[\"/$name\"]" "$NONROOT" "${specs[@]}" >/dev/null
    python3 "$E2E_DIR/lib/dockerfile.py" check "$REPO_DIR/Dockerfile" "$name" \
        "$IMAGE_DIR/$name.tar" "$root" "${LABEL_ARGS[@]}" ||
        die "dbportal/$name:dev differs from the Dockerfile's stage $name (above)"
}

# shared_object_specs BIN...: DEST=SRC:MODE specs for BINs and every shared
# library `ldd` lists for them (including the dynamic loader), at the same
# paths as on this machine.
shared_object_specs() {
    local f
    {
        printf '%s\n' "$@"
        ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }'
    } | sort -u | while IFS= read -r f; do
        printf '%s=%s:0755\n' "${f#/}" "$(readlink -f "$f")"
    done
}

build_toolbox() {
    local specs=() bb=/bin/busybox
    if [[ ! -x $bb ]] || ! is_static "$bb"; then
        log "installing busybox-static"
        apt_install busybox-static
    fi
    command -v curl >/dev/null || apt_install curl
    command -v redis-cli >/dev/null ||
        apt_install redis-tools
    mapfile -t specs < <(shared_object_specs "$(command -v curl)" "$(command -v redis-cli)")
    write_image "$IMAGE_DIR/toolbox.tar" dbportal/toolbox:dev '["/bin/busybox"]' "" \
        "bin/busybox=$bb:0755" "${specs[@]}" \
        "etc/ssl/certs/ca-certificates.crt=$(ca_bundle):0644" "tmp=DIR:1777" >/dev/null
}

import_images() {
    local dir=$1
    shift
    local sock=$dir/containerd/containerd.sock name
    [[ -S $sock ]] || die "no containerd socket at $sock (is the node in $dir running?)"
    for name in "$@"; do
        ctr --address "$sock" -n k8s.io images import --no-unpack=false \
            "$IMAGE_DIR/$name.tar" >/dev/null ||
            die "importing $IMAGE_DIR/$name.tar failed"
        log "imported dbportal/$name:dev"
    done
}

DYNAMIC=0
LABEL_ARGS=()
[[ -z ${DBPORTAL_IMAGE_VERSION:-} ]] || LABEL_ARGS+=("VERSION=$DBPORTAL_IMAGE_VERSION")
[[ -z ${DBPORTAL_IMAGE_REVISION:-} ]] || LABEL_ARGS+=("REVISION=$DBPORTAL_IMAGE_REVISION")

main() {
    local only=pause,portal,operator,toolbox cargo=1 dir=
    while [[ $# -gt 0 ]]; do
        case $1 in
            --only) only=${2:?}; shift ;;
            --only=*) only=${1#--only=} ;;
            --no-cargo) cargo=0 ;;
            --dynamic) DYNAMIC=1 ;;
            -h | --help) usage ;;
            -*) usage ;;
            *) [[ -z $dir ]] || usage; dir=$1 ;;
        esac
        shift
    done
    local images=() name
    IFS=, read -r -a images <<<"$only"
    for name in "${images[@]}"; do
        case $name in pause | portal | operator | toolbox) ;; *) die "unknown image: $name" ;; esac
    done
    mkdir -p "$IMAGE_DIR"
    local t0
    t0=$(now_ms)
    if [[ $cargo -eq 1 && ,$only, =~ ,(portal|operator), ]]; then
        cargo_build
        log "cargo build done after $(($(now_ms) - t0)) ms"
    elif [[ $DYNAMIC -eq 0 && ,$only, =~ ,(portal|operator), ]]; then
        bash "$E2E_DIR/lib/image-rootfs.sh" --no-cargo "$IMAGE_DIR/rootfs"
    fi
    for name in "${images[@]}"; do
        case $name in
            pause) build_pause ;;
            toolbox) build_toolbox ;;
            *) build_rust_image "$name" ;;
        esac
        log "built dbportal/$name:dev ($IMAGE_DIR/$name.tar, $(du -h "$IMAGE_DIR/$name.tar" | cut -f1))"
    done
    if [[ -n $dir ]]; then
        import_images "$(cd "$dir" && pwd -P)" "${images[@]}"
    fi
    log "done after $(($(now_ms) - t0)) ms"
}

main "$@"
exit $?
