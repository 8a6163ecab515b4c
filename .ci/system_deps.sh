#!/usr/bin/env bash
# Install the Debian packages that some tests use, when we can (root + apt-get). Tests that need a
# missing one skip themselves with the reason; nothing here is fatal.
pkgs=(wordnet-base nginx-light chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && { echo "system packages: all present (${pkgs[*]})"; exit 0; }
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages: cannot install ${missing[*]} (not root or no apt-get); the tests that need them will be skipped"
  exit 0
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1); then
  echo "system packages: apt-get could not install ${missing[*]}; the tests that need them will be skipped"
fi
exit 0
