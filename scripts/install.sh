#!/usr/bin/env bash
# Installs everything vmcloud needs on a fresh Debian machine, as root: the system packages, then
# vmcloud itself (editable, with its test tools) into ./.venv.  Safe to run again; a second run with
# nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v ip >/dev/null 2>&1 || packages+=(iproute2)
command -v bridge >/dev/null 2>&1 || packages+=(iproute2)
command -v setsid >/dev/null 2>&1 || packages+=(util-linux)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v node >/dev/null 2>&1 || packages+=(nodejs)  # runs tests/api/vmcloud_js_check.js (static/vmcloud.js)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
# the browser VM (issue #9): Chromium on Xvnc with PulseAudio; setpriv (util-linux) guards its processes
[ -x /usr/lib/chromium/chromium ] || packages+=(chromium)
command -v Xvnc >/dev/null 2>&1 || packages+=(tigervnc-standalone-server)
command -v pulseaudio >/dev/null 2>&1 || packages+=(pulseaudio)
command -v ffmpeg >/dev/null 2>&1 || packages+=(ffmpeg)  # the VM's sound: guest_agent/audio.py encodes Opus
command -v xdotool >/dev/null 2>&1 || packages+=(xdotool)  # tests/console ask the X server where its pointer is
command -v setpriv >/dev/null 2>&1 || packages+=(util-linux)
command -v xdpyinfo >/dev/null 2>&1 || packages+=(x11-utils)  # tests/integration/test_browser_isolation.py
fc-list 2>/dev/null | grep -qi dejavu || packages+=(fonts-dejavu-core)
command -v pacat >/dev/null 2>&1 || packages+=(pulseaudio-utils)  # bench/worker.py listens to a VM's speaker
for t in debootstrap systemd-analyze:systemd shellcheck; do command -v "${t%%:*}" >/dev/null 2>&1 || packages+=("${t#*:}"); done  # tests/integration/test_guest_image.py
# the external-broker tests (scripts/rabbitmq-stomp.sh enables its STOMP plugin on 127.0.0.1:61614)
command -v rabbitmqctl >/dev/null 2>&1 || packages+=(rabbitmq-server)
if [ ${#packages[@]} -gt 0 ]; then
    echo "install.sh: installing system packages: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.vmcloud-installed
want=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "install.sh: installing vmcloud and its Python dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" \
        --config-settings editable_mode=compat
    echo "$want" > "$stamp"
fi
# twistd caches plugin discovery; a stale cache from another checkout would hide ours.
rm -f twisted/plugins/dropin.cache
