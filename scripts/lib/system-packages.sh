# Sourced by the scripts: makes sure the system packages a build needs are there, installing
# them with apt when run as root, or saying what to install otherwise.

# install_packages PKG… — installs what is listed (as root), or says what to run and stops.
install_packages() {
  (($#)) || return 0
  if [ "$(id -u)" = 0 ]; then
    echo "installing system packages: $*" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
  else
    echo "missing system packages: $*; install them with: sudo apt-get install $*" >&2
    exit 1
  fi
}

# The agent, the gateway and the CLI.
ensure_build_packages() {
  local need=()
  command -v cc >/dev/null 2>&1 || need+=(build-essential)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  if ! pkg-config --exists libudev 2>/dev/null; then need+=(libudev-dev); fi
  install_packages "${need[@]}"
}

# What the tests of the deployment files use (systemd-analyze verify).
ensure_packaging_packages() {
  command -v systemd-analyze >/dev/null 2>&1 || install_packages systemd
}

# The tray app (Tauri on WebKitGTK), its web front end, and its tests: Node.js for the UI build,
# Chromium for the UI tests, and Xvfb, a D-Bus session, a tray host and X tools for the smoke
# test and its screenshots.
ensure_desktop_packages() {
  ensure_build_packages
  ensure_packaging_packages
  local need=()
  pkg-config --exists webkit2gtk-4.1 2>/dev/null || need+=(libwebkit2gtk-4.1-dev)
  pkg-config --exists ayatana-appindicator3-0.1 2>/dev/null || need+=(libayatana-appindicator3-dev)
  pkg-config --exists librsvg-2.0 2>/dev/null || need+=(librsvg2-dev)
  [ -e /usr/include/xdo.h ] || need+=(libxdo-dev)
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v Xvfb >/dev/null 2>&1 || need+=(xvfb xauth)
  command -v dbus-daemon >/dev/null 2>&1 || need+=(dbus-daemon)
  command -v dbus-launch >/dev/null 2>&1 || need+=(dbus-x11)
  command -v trayer >/dev/null 2>&1 || need+=(trayer)
  command -v xwininfo >/dev/null 2>&1 || need+=(x11-utils)
  command -v xdotool >/dev/null 2>&1 || need+=(xdotool)
  command -v import >/dev/null 2>&1 || need+=(imagemagick)
  # The gRPC end-to-end test's real client and server.
  /usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || need+=(python3-grpcio)
  # The end-to-end tests' real HTTP client.
  command -v curl >/dev/null 2>&1 || need+=(curl)
  install_packages "${need[@]}"
}

# Everything the test command needs: the tray app's packages, Debian's PostgreSQL server,
# which the tests start on their own (crates/testkit/src/postgres.rs; any version, the newest
# is used), and the carrier tests' proxy, front end and firewall.
ensure_test_packages() {
  ensure_desktop_packages
  local need=()
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
  # The TCP carrier's tests: a real HTTP proxy (CONNECT), a real TLS-terminating WebSocket
  # front end, and a network namespace whose UDP nftables drops.
  command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  command -v nft >/dev/null 2>&1 || need+=(nftables)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v unshare >/dev/null 2>&1 || need+=(util-linux)
  # The example that verifies X-Touchgate-Assertion in Python (PyJWT; its ES256 needs
  # python3-cryptography, which python3-jwt only recommends).
  /usr/bin/python3 -c 'import jwt' >/dev/null 2>&1 || need+=(python3-jwt)
  /usr/bin/python3 -c 'import cryptography' >/dev/null 2>&1 || need+=(python3-cryptography)
  install_packages "${need[@]}"
}
