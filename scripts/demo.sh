#!/usr/bin/env bash
# The main job on a built-in example, on a fresh Debian 12 machine:
# builds a small image family (redis, three builds) from real Debian
# packages, refactors v1 and then its point release incrementally into an
# OCI layout, and shows what the second one reused.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

family=${1:-redis}
cache=${BREAKFS_CACHE:-$HOME/.cache/breakfs}
out=${BREAKFS_DEMO_OUT:-$cache/demo/$family}

echo "==> building breakfs"
cargo build --release --quiet
echo "==> building the example images ($family v1, point, v2) from Debian packages (cached in $cache)"
cargo bench --quiet --bench corpus -- "$family"
src="$cache/corpus/$family"
rm -rf "$out"
echo "==> breakfs refactor v1 (from scratch)"
./target/release/breakfs refactor --to "oci:$out" "oci:$src:v1"
echo "==> breakfs refactor point (reuses v1's layers)"
./target/release/breakfs refactor --to "oci:$out" "oci:$src:point"
echo "==> breakfs inspect"
./target/release/breakfs inspect "oci:$out:point"
