#!/usr/bin/env bash
# Builds the container image from the Dockerfile with buildah (daemonless: vfs
# storage, chroot isolation; no Docker engine, no root daemon) and runs the binary
# inside it: `--version`, then `check` against a local TLS redis-server and the
# token emulator (the container shares the host's loopback).
#
# Registry images cannot be pulled where this runs, so the Dockerfile's base images
# (build arguments BUILD_IMAGE and RUNTIME_IMAGE) are replaced by stand-ins built
# here from Debian 12 packages:
#   - build: debootstrap (minbase) bookworm + gcc, libc6-dev, ca-certificates, and
#     the Rust toolchain this machine builds with (rustc and cargo, the version the
#     Dockerfile's rust:<version>-slim-bookworm names), CARGO_HOME=/usr/local/cargo;
#   - runtime: from scratch, the files of the Debian packages libc6 and libgcc-s1,
#     the CA bundle, a nonroot user 65532; no shell (as distroless/cc).
# What this proves: the Dockerfile's instructions run (apt-get in the build stage,
# the cache mounts, the COPYs from an allow-list build context, the release build
# with jemalloc, the copy into the runtime stage, USER, ENTRYPOINT with --defaults),
# the binary runs on a bookworm glibc without a shell and can reach, verify and
# authenticate to a TLS Redis with a token. What it cannot: that the real base
# images (rust:..., gcr.io/distroless/cc-debian12) behave as the stand-ins do, that
# Docker/BuildKit builds it the same way, the HEALTHCHECK under a real engine, or
# multi-arch.
#
# Bounded: each phase has a timeout (IMAGE_BUILD_TIMEOUT for the image, default
# 40 minutes on a cold cache); the stand-ins are kept in target/image-build and
# reused while the Dockerfile's base image names do not change.
# Prints the image size and the build time. Needs root (chroot isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="$root/target/image-build"
mkdir -p "$out"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
storage=(--storage-driver vfs --root "$out/storage" --runroot "$out/run")
bh() { buildah "${storage[@]}" "$@"; }

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
buildah --version

# The Rust version the Dockerfile's build image names (rust:1.95.0-slim-bookworm).
rust_version=$(sed -n 's/^ARG BUILD_IMAGE=rust:\([0-9.]*\)-.*/\1/p' Dockerfile)
[ -n "$rust_version" ] || { echo "no rust:<version> BUILD_IMAGE default in the Dockerfile" >&2; exit 1; }
have=$(rustc --version | awk '{print $2}')
if [ "$have" != "$rust_version" ]; then
  echo "the Dockerfile builds with Rust $rust_version; this machine has $have" >&2
  exit 1
fi
build_image=localhost/rust-standin:$rust_version-slim-bookworm
runtime_image=localhost/distroless-cc-standin:debian12-nonroot

if ! bh inspect --type image "$build_image" >/dev/null 2>&1; then
  echo "==> build stand-in $build_image (debootstrap bookworm + gcc + Rust $rust_version)"
  rootfs="$out/build-rootfs"
  rm -rf "$rootfs"
  timeout 20m debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
  sysroot=$(rustc --print sysroot)
  mkdir -p "$rootfs/opt/rust/bin" "$rootfs/opt/rust/lib"
  cp -a "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$rootfs/opt/rust/bin/"
  cp -a "$sysroot/lib/." "$rootfs/opt/rust/lib/"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb
  # This machine's trust store: where HTTPS goes through an inspecting proxy,
  # cargo inside the build needs its CA to reach crates.io.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  ctr=$(bh from scratch)
  bh add "$ctr" "$rootfs" / >/dev/null
  bh config --env PATH=/usr/local/cargo/bin:/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo --workingdir / "$ctr"
  bh commit --quiet "$ctr" "$build_image" >/dev/null
  bh rm "$ctr" >/dev/null
  rm -rf "$rootfs"
fi

if ! bh inspect --type image "$runtime_image" >/dev/null 2>&1; then
  echo "==> runtime stand-in $runtime_image (libc6, libgcc-s1, CA bundle, user 65532; no shell)"
  rootfs="$out/runtime-rootfs"
  rm -rf "$rootfs" "$out/debs"
  mkdir -p "$rootfs" "$out/debs"
  (cd "$out/debs" && apt-get download libc6 libgcc-s1 >/dev/null)
  for deb in "$out"/debs/*.deb; do dpkg-deb -x "$deb" "$rootfs"; done
  # Only the shared libraries and the loader: no shell, no tools.
  rm -rf "$rootfs/usr/bin" "$rootfs/usr/sbin" "$rootfs/usr/share" "$rootfs/usr/libexec" "$rootfs/sbin"
  mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
  ctr=$(bh from scratch)
  bh add "$ctr" "$rootfs" / >/dev/null
  bh config --user 65532:65532 --workingdir /home/nonroot "$ctr"
  bh commit --quiet "$ctr" "$runtime_image" >/dev/null
  bh rm "$ctr" >/dev/null
  rm -rf "$rootfs" "$out/debs"
fi

echo "==> buildah build (vfs, chroot) with the stand-ins"
started=$(date +%s)
timeout "${IMAGE_BUILD_TIMEOUT:-40m}" buildah "${storage[@]}" build --isolation chroot --layers=false \
  --build-arg BUILD_IMAGE="$build_image" --build-arg RUNTIME_IMAGE="$runtime_image" \
  --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" \
  -t localhost/redis-entra-proxy:ci . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log" >&2; echo "image build failed; log: $out/build.log" >&2; exit 1; }
build_secs=$(( $(date +%s) - started ))
size_h=$(bh images --format '{{.Size}}' localhost/redis-entra-proxy:ci 2>/dev/null | head -1)
echo "image built in ${build_secs}s; size $size_h"

echo "==> the binary inside the image"
ctr=$(bh from localhost/redis-entra-proxy:ci)
trap 'bh rm "$ctr" >/dev/null 2>&1 || true; cleanup' EXIT
bh run "$ctr" -- /usr/local/bin/redis-entra-proxy --version

# A local TLS redis-server and the token emulator (from scripts/local-stack.sh),
# on ports of their own; the container shares the host's loopback.
work=target/image-build/stack TLS_PORT=${IMAGE_TLS_PORT:-16380} PROXY_PORT=${IMAGE_PROXY_PORT:-16379} \
  ADMIN_PORT=${IMAGE_ADMIN_PORT:-19090}
. scripts/local-stack.sh
trap 'bh rm "$ctr" >/dev/null 2>&1 || true; cleanup' EXIT
rm -rf "$work"; mkdir -p "$work"
# The helpers in the debug profile: CI's test run has built them already.
examples="$target/debug/examples"
cargo build --quiet --example testpki --example token_emulator
"$examples/testpki" "$work/tls" >/dev/null
admin_pass="adm-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" admin "$admin_pass"
redis-server "$work/redis.conf" >/dev/null &
pids+=($!)
wait_port "$TLS_PORT"
start_emulator image-check-oid- 300 "$work/endpoint" "$work/emulator.log"
echo "==> redis-entra-proxy check, inside the image, against 127.0.0.1:$TLS_PORT"
timeout 2m buildah "${storage[@]}" run -v "$root/$work/tls:/tls:ro" \
  --env REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
  --env REDIS_ENTRA_PROXY_UPSTREAM__PORT="$TLS_PORT" \
  --env REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE=/tls/ca.pem \
  --env REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL=managed-identity \
  --env REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT="$(cat "$work/endpoint")" \
  --env REDIS_ENTRA_PROXY_LOG__LEVEL=warn \
  "$ctr" -- /usr/local/bin/redis-entra-proxy --defaults /etc/redis-entra-proxy/image-defaults.toml check
echo "image check passed (build ${build_secs}s, size $size_h)"
