#!/usr/bin/env bash
# One self-contained bundle for an air-gapped GPU host (linux-x64): this Node
# binary (Node 20), the production node_modules pruned to linux-x64, and the
# project (src, the WebGPU test and its helpers, the bench). Unpack and run it
# with scripts/gpu-check.sh, which needs no Node.js and no network there.
#
#   bash scripts/gpu-bundle.sh [OUT.tar.xz]      # default: deltaserve-gpu.tar.xz
#
# Built offline from this checkout (npm prune deletes, it fetches nothing);
# fails if the result passes 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-deltaserve-gpu.tar.xz}")
limit=$((64 * 1024 * 1024))

node_bin=$(node -p process.execPath)
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" = 20 ] || { echo "gpu-bundle: this Node is $(node -v); the bundle ships Node 20" >&2; exit 1; }
[ "$(node -p 'process.platform + "-" + process.arch')" = linux-x64 ] || { echo "gpu-bundle: build it on linux-x64" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/deltaserve-gpu"
mkdir -p "$root/node/bin" "$root/app"
cp "$node_bin" "$root/node/bin/node"
strip "$root/node/bin/node" 2>/dev/null || true

# The project: what the check runs, nothing else.
cp package.json package-lock.json tsconfig.json "$root/app/"
cp -r src bench "$root/app/"
mkdir -p "$root/app/test" "$root/app/scripts"
cp test/engine-webgpu.test.ts "$root/app/test/"
cp -r test/helpers "$root/app/test/"
cp scripts/gpu-check.sh "$root/app/scripts/"

echo "gpu-bundle: pruning node_modules to production, linux-x64" >&2
# Production dependencies only, from this checkout's node_modules.
cp -a node_modules "$root/app/node_modules"
(cd "$root/app" && npm prune --omit=dev --no-audit --no-fund --offline >/dev/null 2>&1)
ortbin="$root/app/node_modules/onnxruntime-node/bin/napi-v6"
for d in "$ortbin"/*/*; do
  [ "$d" = "$ortbin/linux/x64" ] || rm -rf "$d"
done
find "$root/app/node_modules" -depth -type d \( -name '*darwin*' -o -name '*win32*' -o -name '*-arm64' -o -name '*android*' -o -name '*freebsd*' \) -prune -exec rm -rf {} +
find "$root/app/node_modules" -type f \( -name '*.map' -o -name '*.md' -o -name '*.d.ts' \) -delete

echo "gpu-bundle: compressing $(du -sh "$root" | cut -f1)" >&2
XZ_OPT='-6 -T0' tar -C "$stage" -cJf "$out" deltaserve-gpu
size=$(stat -c %s "$out")
echo "gpu-bundle: $out, $((size / 1024 / 1024)) MiB ($size bytes; limit 64 MiB)"
[ "$size" -le "$limit" ] || { echo "gpu-bundle: over 64 MiB" >&2; exit 1; }
