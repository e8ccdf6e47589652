#!/usr/bin/env bash
# Turns a Debian 12 or Ubuntu 24.04 system into a vmcloud guest (a browser VM the Nova driver boots):
#   - the browser stack the agent drives (Chromium, TigerVNC's Xvnc, PulseAudio, ffmpeg, fonts),
#     cloud-init (it fetches the user-data the controller writes) and nftables; on Ubuntu 24.04, whose
#     Chromium is a snap, Debian 12's chromium package (pinned: nothing else of Debian's but three
#     libraries Ubuntu lacks);
#   - the guest agent in a venv, /opt/vmcloud/.venv, from this checkout's wheel, with only the
#     libraries the agent imports (GUEST_REQUIREMENTS below; the controller's are left out);
#   - etc/vmcloud-guest.service (as shipped in the wheel), with a drop-in that starts it after
#     cloud-init and hands it cloud-init's copy of the user-data ($VMCLOUD_USER_DATA);
#   - a firewall unit that keeps the browser (uid 2000000000 and above) away from the metadata
#     service, whose user-data holds the VM's broker passcode.
#
#   scripts/guest-image.sh [--root DIR] [--wheel FILE] [--apt-cache DIR] [--pip-cache DIR]
#
# --root DIR   a mounted root file system (a cloud image's partition, a debootstrap chroot); without
#              it, the machine this runs on.  Run as root.  Safe to run again: what is there stays.
# --wheel FILE the vmcloud wheel to install (default: built from this checkout).
# --apt-cache DIR / --pip-cache DIR   reuse the .deb and pip caches in DIR (bound into the root);
#              without them the image keeps no download caches.
#
# Needs the network (the distribution's archive and PyPI).  Nothing is started inside --root.
set -euo pipefail

VENV=/opt/vmcloud/.venv
CONF_DIR=/etc/vmcloud
UNIT_DIR=/etc/systemd/system
# What cloud-init keeps of the server's user-data (mode 0600): the agent's [agent] section.
CLOUD_USER_DATA=/var/lib/cloud/instance/user-data.txt
# The apt packages of a guest: the browser stack as guest_agent/stack.py and audio.py look for it
# (scripts/install.sh installs the same on a development machine), the venv, cloud-init, nftables.
GUEST_PACKAGES=(
    chromium tigervnc-standalone-server tigervnc-common pulseaudio pulseaudio-utils ffmpeg
    fonts-dejavu-core fonts-liberation util-linux
    python3 python3-venv ca-certificates cloud-init nftables systemd
)
# What guest_agent (and the vmcloud.words/stomp/service/boundedjson modules it shares) imports;
# each line as in setup.py's install_requires (tests/integration/test_guest_image.py keeps them equal).
GUEST_REQUIREMENTS=(
    "twisted[tls]>=25.5"
    "attrs>=23"
    "zope.interface>=6"
    "netifaces-plus>=0.12"
    "txaio>=23"
    "autobahn[twisted]>=24"
)

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
ROOT=/
WHEEL=
APT_CACHE=
PIP_CACHE=

say() { echo "guest-image: $*"; }
die() {
    echo "guest-image: error: $*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --apt-cache) APT_CACHE=${2:?--apt-cache needs a directory}; shift 2 ;;
        --pip-cache) PIP_CACHE=${2:?--pip-cache needs a directory}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "guest-image: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and systemd units)"
[ -d "$ROOT" ] || die "--root $ROOT: no such directory"
ROOT=$(cd "$ROOT" && pwd)
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
for cache in "$APT_CACHE" "$PIP_CACHE"; do
    [ -z "$cache" ] || mkdir -p "$cache" || die "cannot create cache directory $cache"
done

# ---------------------------------------------------------------- the target and its clean-up
TMP=$(mktemp -d /tmp/vmcloud-guest-image.XXXXXX)
MOUNTS=()          # mounted inside ROOT, unmounted in reverse order on exit
RESTORE_RESOLV=    # "keep" (the root's own), "absent" or a saved copy's path
POLICY_RC_ADDED=
WHEEL_IN_ROOT=     # the wheel, copied into ROOT for pip while this runs
BUILD_CA=          # the build host's CA bundle, copied into ROOT for pip while this runs

cleanup() {
    local status=$? i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" ||
            echo "guest-image: warning: could not unmount ${MOUNTS[$i]}" >&2
    done
    if [ -n "$POLICY_RC_ADDED" ]; then rm -f "$ROOT/usr/sbin/policy-rc.d"; fi
    if [ -n "$BUILD_CA" ]; then rm -f "$ROOT$BUILD_CA"; fi
    if [ -n "$WHEEL_IN_ROOT" ]; then rm -f "$ROOT$WHEEL_IN_ROOT"; fi
    case "$RESTORE_RESOLV" in
        "" | keep) ;;
        absent) rm -f "$ROOT/etc/resolv.conf" ;;
        *) rm -f "$ROOT/etc/resolv.conf"; mv "$RESTORE_RESOLV" "$ROOT/etc/resolv.conf" ;;
    esac
    rm -rf "$TMP"
    if [ "$status" -ne 0 ]; then echo "guest-image: failed (exit status $status)" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

bind_into_root() {  # bind_into_root SOURCE TARGET-INSIDE-ROOT [mount options...]
    local source=$1 target=$ROOT$2
    shift 2
    mkdir -p "$target"
    mount "$@" "$source" "$target"
    MOUNTS+=("$target")
}

in_root() {
    if [ "$ROOT" = / ]; then
        "$@"
    else
        chroot "$ROOT" "$@"
    fi
}

[ -r "$ROOT/etc/os-release" ] || die "$ROOT/etc/os-release missing: not a Debian or Ubuntu root"
# shellcheck disable=SC1091
os=$(. "$ROOT/etc/os-release" && echo "${ID:-?} ${VERSION_ID:-?}")
case "$os" in
    "debian 12" | "ubuntu 24.04") say "target: $os at $ROOT" ;;
    *) die "target is '$os'; only Debian 12 and Ubuntu 24.04 are supported" ;;
esac
DEBIAN_CHROMIUM=
if [ "$os" = "ubuntu 24.04" ]; then
    if [ -x "$ROOT/usr/lib/chromium/chromium" ] || [ -x "$ROOT/usr/lib/chromium-browser/chromium-browser" ]; then
        GUEST_PACKAGES=("${GUEST_PACKAGES[@]/chromium/}")  # a .deb build is there already: keep it
    else
        DEBIAN_CHROMIUM=1
    fi
fi

if [ "$ROOT" != / ]; then
    for fs in proc sys dev; do
        if mountpoint -q "$ROOT/$fs"; then die "$ROOT/$fs is already mounted; unmount it first"; fi
    done
    bind_into_root proc /proc -t proc
    bind_into_root sysfs /sys -t sysfs -o ro
    bind_into_root /dev /dev --bind
    bind_into_root devpts /dev/pts -t devpts -o newinstance,ptmxmode=0666
    # name resolution inside the root: the host's, put back afterwards (cloud images often link
    # resolv.conf to systemd-resolved's stub, which does not run here)
    if [ -L "$ROOT/etc/resolv.conf" ] || [ -e "$ROOT/etc/resolv.conf" ]; then
        RESTORE_RESOLV=$TMP/resolv.conf.saved
        mv "$ROOT/etc/resolv.conf" "$RESTORE_RESOLV"
    else
        RESTORE_RESOLV=absent
    fi
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # no package may start a service inside the root
    if [ ! -e "$ROOT/usr/sbin/policy-rc.d" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
        chmod 755 "$ROOT/usr/sbin/policy-rc.d"
        POLICY_RC_ADDED=1
    fi
fi
if [ -n "$APT_CACHE" ]; then
    bind_into_root "$APT_CACHE" /var/cache/apt/archives --bind
fi
pip_cache_args=(--no-cache-dir)
if [ -n "$PIP_CACHE" ]; then
    bind_into_root "$PIP_CACHE" /var/cache/vmcloud-pip --bind
    pip_cache_args=(--cache-dir /var/cache/vmcloud-pip)
fi

# ---------------------------------------------------------------- packages
if [ -n "$DEBIAN_CHROMIUM" ]; then
    # Ubuntu 24.04 packages Chromium as a snap only (its chromium-browser installs the snap), which
    # cannot go into an image from here and is not where the agent looks (/usr/lib/chromium).  Debian
    # 12's chromium installs on it: from deb.debian.org (bookworm and its security updates), pinned so
    # that nothing else comes from Debian but the three libraries Ubuntu 24.04 lacks.
    say "Ubuntu 24.04 has Chromium as a snap only: taking Debian 12's chromium package, pinned"
    export DEBIAN_FRONTEND=noninteractive
    if [ ! -f "$ROOT/usr/share/keyrings/debian-archive-keyring.gpg" ]; then
        in_root apt-get update -qq
        in_root apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 debian-archive-keyring >/dev/null
    fi
    cat >"$ROOT/etc/apt/sources.list.d/vmcloud-debian-chromium.sources" <<'EOF'
# Written by vmcloud's scripts/guest-image.sh: Debian 12's Chromium (Ubuntu 24.04 has a snap only).
# /etc/apt/preferences.d/vmcloud-debian-chromium keeps everything else from coming from here.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$ROOT/etc/apt/preferences.d/vmcloud-debian-chromium" <<'EOF'
# Written by vmcloud's scripts/guest-image.sh: from Debian, only Chromium and what Ubuntu 24.04 lacks.
Package: *
Pin: release o=Debian
Pin-Priority: -1

Package: chromium chromium-common chromium-sandbox libdav1d6 libjpeg62-turbo libminizip1
Pin: release o=Debian
Pin-Priority: 500
EOF
fi
missing=()
for package in "${GUEST_PACKAGES[@]}"; do
    [ -n "$package" ] || continue
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not the shell's
    status=$(in_root dpkg-query -W -f '${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    in_root apt-get update -qq
    in_root apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
    if [ -z "$APT_CACHE" ]; then in_root apt-get clean; fi
else
    say "packages: all there"
fi

# ---------------------------------------------------------------- the agent
if [ -z "$WHEEL" ]; then
    say "building the vmcloud wheel from $CHECKOUT"
    # a copy of what the wheel is made of, so the checkout gets no build/ or egg-info of ours
    mkdir "$TMP/src" "$TMP/wheel"
    for part in setup.py pyproject.toml README.rst vmcloud guest_agent twisted etc static; do
        cp -a "$CHECKOUT/$part" "$TMP/src/"
    done
    find "$TMP/src" \( -name __pycache__ -o -name dropin.cache \) -prune -exec rm -rf {} +
    builder=
    for candidate in "$CHECKOUT/.venv/bin/python" python3; do
        if "$candidate" -m pip --version >/dev/null 2>&1; then builder=$candidate; break; fi
    done
    if [ -z "$builder" ]; then
        # a bare machine: the target's own venv builds it (no --root: this machine is the target)
        [ "$ROOT" = / ] || die "no python3 with pip here to build the wheel; pass --wheel FILE"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        builder=$VENV/bin/python
    fi
    "$builder" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/wheel" "$TMP/src" ||
        die "building the wheel failed"
    WHEEL=$(find "$TMP/wheel" -name 'vmcloud-*.whl' | head -n 1)
    [ -n "$WHEEL" ] || die "pip built no vmcloud wheel"
fi
want=$( (sha256sum <"$WHEEL" | cut -d' ' -f1; printf '%s\n' "${GUEST_REQUIREMENTS[@]}") | sha256sum | cut -d' ' -f1)
stamp=$VENV/.vmcloud-guest-installed
if [ "$(cat "$ROOT$stamp" 2>/dev/null || true)" = "$want" ]; then
    say "agent: $VENV already has this wheel"
else
    say "installing the agent into $VENV"
    [ -x "$ROOT$VENV/bin/python" ] || in_root python3 -m venv "$VENV"
    mkdir -p "$ROOT/tmp"
    WHEEL_IN_ROOT=/tmp/$(basename "$WHEEL")
    cp "$WHEEL" "$ROOT$WHEEL_IN_ROOT"
    pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
    host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    if [ "$ROOT" != / ] && [ -f "$host_ca" ]; then
        # pip in the root trusts what the build host trusts (a TLS-inspecting proxy on the build
        # network); the copy is gone when this script ends, the image keeps its own CAs
        BUILD_CA=/tmp/vmcloud-build-ca.crt
        cp "$host_ca" "$ROOT$BUILD_CA"
        # requests prefers these variables to pip's --cert: all of them name the copy
        pip=(env -u PIP_FIND_LINKS "PIP_CERT=$BUILD_CA" "REQUESTS_CA_BUNDLE=$BUILD_CA" "SSL_CERT_FILE=$BUILD_CA"
            "CURL_CA_BUNDLE=$BUILD_CA" "${pip[@]}")
    fi
    in_root "${pip[@]}" install "${pip_cache_args[@]}" "${GUEST_REQUIREMENTS[@]}"
    # --no-deps: the controller's libraries (novaclient, klein, ...) stay out of the guest
    in_root "${pip[@]}" install "${pip_cache_args[@]}" --no-deps --force-reinstall "$WHEEL_IN_ROOT"
    rm -f "$ROOT$VENV/lib/"python3*/site-packages/twisted/plugins/dropin.cache
    in_root "$VENV/bin/twistd" vmcloud-guest --help >/dev/null ||
        die "the installed agent does not start: $VENV/bin/twistd vmcloud-guest --help fails"
    echo "$want" >"$ROOT$stamp"
fi

# ---------------------------------------------------------------- configuration and units
shared=$ROOT$VENV/share/vmcloud/etc
[ -f "$shared/vmcloud-guest.service" ] || die "the wheel has no share/vmcloud/etc/vmcloud-guest.service"
install -d -m 755 "$ROOT$CONF_DIR"
if [ ! -e "$ROOT$CONF_DIR/vmcloud-guest.conf" ]; then
    # every key commented out: the user-data says where the broker is and who the guest is
    install -m 600 "$shared/vmcloud-guest.conf" "$ROOT$CONF_DIR/vmcloud-guest.conf"
    say "wrote $CONF_DIR/vmcloud-guest.conf (all defaults)"
fi
install -m 644 "$shared/vmcloud-guest.service" "$ROOT$UNIT_DIR/vmcloud-guest.service"
install -d -m 755 "$ROOT$UNIT_DIR/vmcloud-guest.service.d"
cat >"$ROOT$UNIT_DIR/vmcloud-guest.service.d/cloud-init.conf" <<EOF
# Written by vmcloud's scripts/guest-image.sh: the agent reads the user-data the controller gave
# this server (broker address, the VM's STOMP login and passcode) from cloud-init's copy, which
# cloud-init writes before network-online.target.
[Unit]
After=cloud-init.service vmcloud-guest-firewall.service
Wants=vmcloud-guest-firewall.service

[Service]
Environment=VMCLOUD_USER_DATA=$CLOUD_USER_DATA
EOF
cat >"$ROOT$CONF_DIR/guest-firewall.nft" <<'EOF'
#!/usr/sbin/nft -f
# Written by vmcloud's scripts/guest-image.sh.  The browser runs as uid 2000000000 and above
# (browser_user = per-vm); it must not read the metadata service, whose user-data holds this VM's
# broker passcode.  The agent (root) and cloud-init are not affected.
table inet vmcloud_guest
delete table inet vmcloud_guest
table inet vmcloud_guest {
    chain output {
        type filter hook output priority 0; policy accept;
        meta skuid >= 2000000000 ip daddr 169.254.169.254 reject
        meta skuid >= 2000000000 ip6 daddr fe80::a9fe:a9fe reject
    }
}
EOF
cat >"$ROOT$UNIT_DIR/vmcloud-guest-firewall.service" <<EOF
# Written by vmcloud's scripts/guest-image.sh: keeps the browser away from the metadata service.
[Unit]
Description=vmcloud guest: the browser may not reach the metadata service
DefaultDependencies=no
Before=network-pre.target vmcloud-guest.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f $CONF_DIR/guest-firewall.nft

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable vmcloud-guest.service vmcloud-guest-firewall.service >/dev/null 2>&1 ||
    die "systemctl enable vmcloud-guest.service vmcloud-guest-firewall.service failed"
say "units: vmcloud-guest.service (+ cloud-init.conf drop-in), vmcloud-guest-firewall.service, enabled"

if [ "$ROOT" = / ] && [ -d /var/lib/cloud/instances ]; then
    say "note: cloud-init has run on this machine; before snapshotting it as an image run" \
        "'cloud-init clean --logs' so each server reads its own user-data"
fi
say "done: a vmcloud guest ($VENV/bin/twistd vmcloud-guest, reading $CLOUD_USER_DATA)"
