# dbportal images: a Rust builder stage and two runtime stages FROM scratch.
#
#   docker build --target portal   -t dbportal/portal:dev .
#   docker build --target operator -t dbportal/operator:dev .
#   docker build --target portal --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) ...
#
# The builder runs e2e/lib/image-rootfs.sh, which e2e/build-images.sh runs too: static
# binaries (crt-static), build paths remapped, stripped, laid out with the CA bundle (outgoing
# TLS via rustls-native-certs) and /tmp. The runtime stages copy that tree as one layer and run
# as UID/GID 65532. build-images.sh reads the runtime stages' LABEL, ENV, WORKDIR, USER and
# ENTRYPOINT from this file and e2e/lib/dockerfile.py checks every image it writes against
# them (e2e/README.md, "Dockerfile, and how build-images.sh matches it").
#
# The portal checks a configuration file and exits, like `haproxy -c`:
#   docker run --rm -v "$PWD/portal.yaml:/portal.yaml:ro" dbportal/portal:dev --check /portal.yaml
#
# No `# syntax=` line: the cache mounts below are part of the Dockerfile frontend that
# BuildKit bundles (Docker 23 and later build with it by default), so nothing extra is pulled.

# The toolchain the project is built and tested with; bookworm as the CI machines.
FROM docker.io/library/rust:1.95.0-bookworm AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    CARGO_TARGET_DIR=/src/target bash e2e/lib/image-rootfs.sh /out

FROM scratch AS operator
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dbportal-operator" \
      org.opencontainers.image.description="The dbportal operator: reconciles DatabasePortals into portal pods, Services, ConfigMaps and Certificates" \
      org.opencontainers.image.source="https://github.com/dbportal/dbportal" \
      org.opencontainers.image.url="https://github.com/dbportal/dbportal" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="dbportal" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/operator/ /
ENV PATH=/
WORKDIR /
USER 65532:65532
ENTRYPOINT ["/operator"]

FROM scratch AS portal
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dbportal-portal" \
      org.opencontainers.image.description="The dbportal portal: a TCP proxy with TLS, allow-lists, limits and leader following" \
      org.opencontainers.image.source="https://github.com/dbportal/dbportal" \
      org.opencontainers.image.url="https://github.com/dbportal/dbportal" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="dbportal" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/portal/ /
ENV PATH=/
WORKDIR /
USER 65532:65532
ENTRYPOINT ["/portal"]
