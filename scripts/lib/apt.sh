# Shared by the install scripts (source it): `apt_install PACKAGE...` installs Debian
# packages without their recommendations; when that fails (package lists missing or
# stale on a fresh machine) it runs `apt-get update` once and tries again. Quiet on
# success; apt's own errors on failure.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}
