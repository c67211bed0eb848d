# syntax=docker/dockerfile:1
#
# dbportal images: a Rust builder stage and two minimal runtime stages.
#
#   docker build --target portal   -t dbportal/portal:dev .
#   docker build --target operator -t dbportal/operator:dev .
#
# The binaries are linked statically against glibc (crt-static), so the
# runtime images are empty apart from the binary, the CA bundle (outgoing TLS
# via rustls-native-certs) and /tmp; they run as UID/GID 65532.
# e2e/build-images.sh builds the same images without a container engine.

ARG RUST_VERSION=1

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never
COPY . .
# `--target` keeps crt-static away from build scripts and proc-macros.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    set -eux; \
    target=$(rustc -vV | sed -n 's/^host: //p'); \
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target "$target" \
        -p dbportal-portal -p dbportal-operator; \
    mkdir -p /out/bin /out/etc/ssl/certs /out/tmp; \
    chmod 1777 /out/tmp; \
    cp "target/$target/release/portal" "target/$target/release/operator" /out/bin/; \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/; \
    for b in /out/bin/*; do \
        if readelf -lW "$b" | grep -q 'program interpreter'; then \
            echo "$b is not statically linked" >&2; exit 1; \
        fi; \
    done

FROM scratch AS operator
COPY --from=builder /out/etc /etc
COPY --from=builder /out/tmp /tmp
COPY --from=builder /out/bin/operator /operator
USER 65532:65532
ENTRYPOINT ["/operator"]

FROM scratch AS portal
COPY --from=builder /out/etc /etc
COPY --from=builder /out/tmp /tmp
COPY --from=builder /out/bin/portal /portal
USER 65532:65532
ENTRYPOINT ["/portal"]
