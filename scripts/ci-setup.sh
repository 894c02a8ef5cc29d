#!/usr/bin/env bash
# System packages the test suites use, from Debian only. Idempotent: installs
# only what is missing, so a second run is a no-op. Called by .ci/run; run it
# once by hand (as root) to get the same on a development machine.
#
#   lavapipe (mesa-vulkan-drivers 25 from bookworm-backports) + libvulkan1:
#       the WebGPU execution provider's Vulkan, in software, for the GPU code path
#   chromium: the console's browser tests
#   nginx, libnginx-mod-http-js (njs: routing by the task in a JSON body), prometheus
#       (with promtool): the local multi-replica stack (npm run stack, npm run test:deploy)
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "ci-setup: not root; skipping system packages (tests that need them say they skipped)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "ci-setup: no apt-get; skipping system packages" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
missing() { for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done; }

# bookworm-backports carries Mesa 25 (bookworm's Mesa 22.3 lacks what Dawn needs).
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/deltaserve-backports.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  
fi

base=$(missing chromium nginx libnginx-mod-http-js prometheus)
gpu=$(missing mesa-vulkan-drivers libvulkan1)
if [ -n "$base$gpu" ]; then
  apt-get update -qq
  [ -n "$base" ] && apt-get install -y -qq --no-install-recommends $base
  if [ -n "$gpu" ]; then
    if [ "$codename" = bookworm ]; then apt-get install -y -qq --no-install-recommends -t bookworm-backports $gpu
    else apt-get install -y -qq --no-install-recommends $gpu; fi
  fi
fi
echo "ci-setup: system packages present"
