# redis-entra-proxy container image.
#
#   docker build --build-arg VERSION=0.1.0 -t redis-entra-proxy:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) or buildah for the cache
# mounts. The build stage is Debian 12 (bookworm), like the runtime, so the binary
# links against the same glibc it runs with. The base images are build arguments
# (scripts/image-build.sh builds from local stand-ins where registries are out of
# reach); the defaults are the images the release uses.
ARG BUILD_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
# jemalloc (the allocator) builds its C sources with configure and make; the slim
# image has a C compiler but no make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo reads every target the manifest names, even to build one binary.
COPY examples/testpki.rs ./examples/testpki.rs
COPY examples/failover_front.rs ./examples/failover_front.rs
COPY bench/load.rs bench/client.rs bench/phases_load.rs ./bench/
COPY benches/hot_path.rs ./benches/hot_path.rs
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    cargo build --release --locked --bin redis-entra-proxy \
    && install -D -m 0755 target/release/redis-entra-proxy /out/redis-entra-proxy

# distroless/cc: glibc, libgcc and CA certificates (the system trust store that
# rustls-native-certs reads); no shell, no package manager.
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="redis-entra-proxy" \
      org.opencontainers.image.description="Plain RESP on localhost to Azure Redis over TLS with Microsoft Entra ID tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /out/redis-entra-proxy /usr/local/bin/redis-entra-proxy
# The image's own settings (admin server on, on [::]:9090 for kubelet and
# Prometheus) are a defaults file, below the user's config file, environment and
# flags: as ENV they would silently win over a mounted TOML.
COPY deploy/container/image-defaults.toml /etc/redis-entra-proxy/image-defaults.toml
# distroless "nonroot" (65532), numeric so that Kubernetes runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 6379 9090
# No curl or shell here: the binary probes its own admin port (0 = 200 from /readyz).
# It follows admin.readiness like any readiness probe: by default a usable token,
# not a healthy cache connection.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/redis-entra-proxy", "--defaults", "/etc/redis-entra-proxy/image-defaults.toml", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/redis-entra-proxy", "--defaults", "/etc/redis-entra-proxy/image-defaults.toml"]
