#!/usr/bin/env bash
# macOS: wraps the app bundle that `tauri build --bundles app` makes into an installer package
# that also installs the organisation's managed config as
# /Library/Application Support/touchgate/managed.toml (root-owned, 0644).
#   packaging/macos/build-pkg.sh org.toml
# Not run here: it needs macOS (pkgbuild, productbuild) and a Developer ID to sign.
set -euo pipefail
cd "$(dirname "$0")/../.."
managed="${1:?usage: build-pkg.sh org.toml}"
ui/node_modules/.bin/tauri build --bundles app
cargo build --release --locked -p touchgate
root="$(mktemp -d)"
mkdir -p "$root/Applications" "$root/Library/Application Support/touchgate" "$root/usr/local/bin"
cp -R target/release/bundle/macos/touchgate.app "$root/Applications/"
cp target/release/touchgate "$root/usr/local/bin/touchgate"
install -m 0644 "$managed" "$root/Library/Application Support/touchgate/managed.toml"
pkgbuild --root "$root" --identifier dev.touchgate.desktop --version 0.1.0 \
  --install-location / target/release/bundle/touchgate.pkg
echo "target/release/bundle/touchgate.pkg"
