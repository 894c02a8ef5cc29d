#!/usr/bin/env bash
# The GPU check, for a host with no Node.js and no network: unpacks the bundle
# from scripts/gpu-bundle.sh, says whether Vulkan sees a GPU and which driver,
# then with the bundle's own Node runs the WebGPU equality test
# (test/engine-webgpu.test.ts: greedy tokens equal the CPU path's) and the
# transfer and step-time figures at batch 1 and 32 on demo:gpt2-small
# (bench section 15, `--sections device`). A few minutes on a GPU.
#
#   bash gpu-check.sh deltaserve-gpu.tar.xz      # unpacks into a temp dir
#   bash deltaserve-gpu/app/scripts/gpu-check.sh # already unpacked
#
# GPU_CHECK_LAVAPIPE=1 is for trying the check where there is no GPU (Mesa's
# lavapipe, ~15 s a gpt2-small step): the bench runs its --quick form instead
# (demo:gpt2, context 64, batch 1 and 32, every device).
# Output goes to stdout and to gpu-check-report.txt in the working directory.
set -uo pipefail

if [ $# -ge 1 ] && [ -f "$1" ]; then
  dir=$(mktemp -d)
  tar -C "$dir" -xJf "$1" || { echo "gpu-check: cannot unpack $1" >&2; exit 1; }
  app="$dir/deltaserve-gpu/app"
else
  app=$(cd "$(dirname "$0")/.." && pwd)
fi
bundle=$(cd "$app/.." && pwd)
[ -x "$bundle/node/bin/node" ] || { echo "gpu-check: no bundled node under $bundle/node/bin (run it on the unpacked bundle)" >&2; exit 1; }
report="$PWD/gpu-check-report.txt"
exec > >(tee "$report") 2>&1

# The bundle's Node first on PATH: whatever else the host has (or lacks) is not used.
export PATH="$bundle/node/bin:${PATH:-/usr/bin:/bin}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cd "$app"

echo "== deltaserve GPU check, $(date -u +%FT%TZ), $(uname -srm), node $(node -v) from $(command -v node)"
echo "== Vulkan"
if command -v vulkaninfo >/dev/null; then
  vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|driverName|driverInfo|deviceType|apiVersion' || echo "vulkaninfo found no device"
else
  echo "vulkaninfo not installed (package vulkan-tools); Vulkan drivers (ICDs) present:"
  ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | sed 's/^/  /'
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | grep -q '^lvp_icd'; then
  echo "note: Mesa's lavapipe (software) is installed too; a GPU's own driver is preferred by Dawn when present"
fi

echo "== WebGPU equality test (greedy tokens on webgpu vs cpu)"
node --import tsx --test --test-reporter=spec test/engine-webgpu.test.ts 2>&1 | grep -v 'artificially reduced'
test_rc=${PIPESTATUS[0]}

echo "== Bytes per decode step and step time (bench section 15, --sections device)"
if [ "${GPU_CHECK_LAVAPIPE:-0}" = 1 ]; then quick=--quick; else quick=; fi
DELTASERVE_BENCH_GPU=1 node --import tsx bench/run.ts --sections device --no-write $quick 2>&1 | grep -v 'artificially reduced'
bench_rc=${PIPESTATUS[0]}

echo "== result: equality test exit $test_rc, bench exit $bench_rc; report in $report"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
