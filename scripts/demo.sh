#!/usr/bin/env bash
# The main job on a built-in example, on a fresh Debian 12 machine:
# builds a small image family (redis, three builds) from real Debian
# packages, refactors v1 and then its point release incrementally into a
# real docker-registry on loopback, mounts the point release lazily from
# it and browses the mount.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

family=${1:-redis}
cache=${BREAKFS_CACHE:-$HOME/.cache/breakfs}
bin=./target/release/breakfs

echo "==> building breakfs"
cargo build --release --quiet
echo "==> building the example images ($family v1, point, v2) from Debian packages (cached in $cache)"
cargo bench --quiet --bench corpus -- "$family"
src="$cache/corpus/$family"

demo=$(mktemp -d /tmp/breakfs-demo.XXXXXX)
mnt="$demo/mnt"
mkdir -p "$mnt" "$demo/registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$demo/registry.yml" <<YAML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $demo/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$demo/registry.yml" >"$demo/registry.log" 2>&1 &
registry_pid=$!
cleanup() {
    "$bin" umount "$mnt" 2>/dev/null || true
    kill "$registry_pid" 2>/dev/null || true
    rm -rf "$demo"
}
trap cleanup EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

export BREAKFS_PLAIN_HTTP=1
reg="docker://127.0.0.1:$port/demo/$family"
echo "==> breakfs refactor v1 (from scratch) into the registry at 127.0.0.1:$port"
"$bin" refactor --to "$reg:v1" "oci:$src:v1"
echo "==> breakfs refactor point (reuses v1's layers)"
"$bin" refactor --to "$reg:point" "oci:$src:point"
echo "==> breakfs inspect"
"$bin" inspect "$reg:point"

echo "==> breakfs mount (lazy): the tree is there at once, contents arrive when read"
"$bin" mount --no-hydrate --cache "$demo/store" "$reg:point" "$mnt"
ls -l "$mnt"
echo "--- $mnt/usr/bin (first entries)"
ls -l "$mnt/usr/bin" | sed -n 1,8p
if [ "$family" = redis ]; then
    echo "--- redis-server --version, run from the mount (fetches only what it reads)"
    chroot "$mnt" /usr/bin/redis-server --version
fi
sleep 1.5  # the mount writes its status record every second
"$bin" status "$mnt"
echo "==> breakfs umount"
"$bin" umount "$mnt"
