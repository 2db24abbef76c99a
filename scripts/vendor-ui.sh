#!/usr/bin/env bash
# Refresh the web UI's vendored front-end libraries from the npm registry.
#   bash scripts/vendor-ui.sh            # the versions pinned below
# Copies each library's ES module build and its licence into swapd/ui/vendor/
# and prints the sha256 of each file for swapd/ui/vendor/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PREACT=11.2.0
HTM=3.1.1
out=swapd/ui/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "preact@$PREACT" "htm@$HTM" >/dev/null)
for pkg in "preact-$PREACT" "htm-$HTM"; do
    mkdir -p "$tmp/$pkg" && tar xzf "$tmp/$pkg.tgz" -C "$tmp/$pkg"
done
cp "$tmp/preact-$PREACT/package/dist/preact.mjs" "$out/preact.mjs"
cp "$tmp/preact-$PREACT/package/hooks/dist/hooks.mjs" "$out/preact-hooks.mjs"
cp "$tmp/preact-$PREACT/package/LICENSE" "$out/LICENSE-preact.txt"
cp "$tmp/htm-$HTM/package/dist/htm.mjs" "$out/htm.mjs"
cp "$tmp/htm-$HTM/package/LICENSE" "$out/LICENSE-htm.txt"
sha256sum "$out"/*.mjs
