#!/usr/bin/env bash
# Installs what breakfs needs to build and test on Debian 12: the real
# registry, image tools, FUSE and runtimes used by the tests, and Rust.
set -euo pipefail

need_apt=()
for pkg in fuse3 docker-registry skopeo umoci runc containerd stargz-snapshotter attr pigz zstd ca-certificates curl systemd \
    build-essential cmake pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# apt-cache madison needs package lists (the image corpus is built from them).
if [ -z "$(apt-cache madison bash 2>/dev/null)" ]; then
    apt-get update -qq
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "==> installing Rust with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi
