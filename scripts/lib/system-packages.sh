# Sourced by the scripts: makes sure the system packages a build needs are there, installing
# them with apt when run as root, or saying what to install otherwise.
ensure_build_packages() {
  local need=()
  command -v cc >/dev/null 2>&1 || need+=(build-essential)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  if ! pkg-config --exists libudev 2>/dev/null; then need+=(libudev-dev); fi
  if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
      echo "installing system packages: ${need[*]}" >&2
      apt-get update -q >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
    else
      echo "missing system packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
      exit 1
    fi
  fi
}
