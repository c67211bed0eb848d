#!/usr/bin/env bash
# Builds the portal and operator binaries and lays out the root file system of
# each image. The Dockerfile's builder stage and e2e/build-images.sh both run
# this script, so both hold the same files, built the same way.
#
#   image-rootfs.sh [--no-cargo] OUT
#
# OUT/portal/ and OUT/operator/ each get: the stripped binary (/portal,
# /operator, 0755), /etc/ssl/certs/ca-certificates.crt (0644: outgoing TLS via
# rustls-native-certs) and /tmp (1777), directories 0755, everything owned by
# whoever runs this (root in the Dockerfile; build-images.sh writes root).
#
# The build: `cargo build --release --locked --target <host triple>` of both
# crates with `-C target-feature=+crt-static` (glibc linked statically, so the
# images are FROM scratch; `--target` keeps the flag away from build scripts
# and proc-macros) and the build's paths remapped (`--remap-path-prefix`: the
# repository to /src, CARGO_HOME to /cargo, the target directory to
# /src/target), so the binaries name no build machine's paths and a build here
# matches the Dockerfile's byte for byte when the toolchain, Debian's static
# glibc and the release profile are the same. Then `strip --strip-all`.
# `--no-cargo` takes the binaries already built: by default the release build's, or with
# DBPORTAL_IMAGE_PROFILE=debug those that `cargo test --target <host triple>` built with the
# same crt-static flag (what .ci/run does, so that one compilation serves the tests and the
# end-to-end images).
set -euo pipefail

cargo=1
if [[ ${1:-} == --no-cargo ]]; then
    cargo=0
    shift
fi
[[ $# -eq 1 ]] || { sed -n '2,21s/^# \{0,1\}//p' "$0" >&2; exit 2; }
out=$1

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
triple=$(rustc -vV | sed -n 's/^host: //p')
[[ -n $triple ]] || { echo "image-rootfs.sh: rustc -vV names no host" >&2; exit 1; }
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[[ -f $ca_bundle ]] || { echo "image-rootfs.sh: $ca_bundle missing (ca-certificates)" >&2; exit 1; }

if [[ $cargo -eq 1 ]]; then
    (cd "$repo" &&
        RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static \
--remap-path-prefix=$cargo_home=/cargo --remap-path-prefix=$repo=/src \
--remap-path-prefix=$target_dir=/src/target" \
            cargo build --release --locked --target "$triple" \
            -p dbportal-portal -p dbportal-operator >&2)
fi

mkdir -p "$out"
for name in portal operator; do
    bin=$target_dir/$triple/${DBPORTAL_IMAGE_PROFILE:-release}/$name
    [[ -x $bin ]] || { echo "image-rootfs.sh: $bin missing (run without --no-cargo)" >&2; exit 1; }
    if readelf -lW "$bin" | grep -q 'program interpreter'; then
        echo "image-rootfs.sh: $bin is dynamically linked; it would not run FROM scratch" >&2
        exit 1
    fi
    root=$out/$name
    rm -rf "$root"
    mkdir -p "$root/etc/ssl/certs" "$root/tmp"
    chmod 0755 "$root" "$root/etc" "$root/etc/ssl" "$root/etc/ssl/certs"
    chmod 1777 "$root/tmp"
    strip --strip-all -o "$root/$name" "$bin"
    chmod 0755 "$root/$name"
    cp "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
    chmod 0644 "$root/etc/ssl/certs/ca-certificates.crt"
done
