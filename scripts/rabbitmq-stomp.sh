#!/usr/bin/env bash
# Enable RabbitMQ's STOMP plugin with its listener on 127.0.0.1:61614, for the external-broker tests
# ([broker] external = tcp:127.0.0.1:61614).  Port 61613 stays free for vmcloud's embedded broker:
# the plugin would take 61613 by default, so the listener is set before the plugin starts, and it is
# written to /etc/rabbitmq/conf.d so that a restarted RabbitMQ keeps it.
#
# Idempotent: run it as often as you like.  Starts rabbitmq-server if it is not running.  Needs
# root (rabbitmqctl, /etc/rabbitmq).  Ends by opening a real STOMP session as guest/guest and exits
# non-zero, saying why, if that fails.
#
# Environment: VMCLOUD_RABBITMQ_STOMP_PORT (default 61614).
set -uo pipefail

HOST=127.0.0.1
PORT="${VMCLOUD_RABBITMQ_STOMP_PORT:-61614}"
CONF_DIR=/etc/rabbitmq/conf.d
CONF_FILE="$CONF_DIR/90-vmcloud-stomp.conf"
LISTENERS="[{\"$HOST\", $PORT}]"

say() { echo "rabbitmq-stomp: $*"; }
die() { say "$*" >&2; exit 1; }

for tool in rabbitmqctl rabbitmq-plugins rabbitmq-server rabbitmq-diagnostics; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: install RabbitMQ (apt-get install rabbitmq-server)"
done

running() { timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

# A real STOMP session: CONNECT as guest/guest, expect CONNECTED.
stomp_ok() {
    local reply
    reply=$(
        exec 3<>"/dev/tcp/$HOST/$PORT" 2>/dev/null || exit 1
        printf 'CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0' >&3
        timeout 5 head -c 9 <&3
        exec 3>&-
    ) 2>/dev/null
    [ "$reply" = "CONNECTED" ]
}

# 1. RabbitMQ itself.
if ! running; then
    say "starting rabbitmq-server"
    rabbitmq-server -detached || die "rabbitmq-server -detached failed"
    for _ in $(seq 90); do
        running && break
        sleep 1
    done
    running || die "RabbitMQ did not come up within 90 s (see /var/log/rabbitmq)"
fi
timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || die "RabbitMQ did not finish booting"

# 2. The listener, before the plugin starts (or restarted with it if it runs elsewhere).
current=$(timeout 30 rabbitmqctl -q eval 'application:get_env(rabbitmq_stomp, tcp_listeners).' 2>/dev/null)
enabled=$(timeout 30 rabbitmq-plugins -q list -e rabbitmq_stomp 2>/dev/null | grep -c 'rabbitmq_stomp' || true)
if [ "$enabled" -eq 0 ]; then
    say "enabling rabbitmq_stomp on $HOST:$PORT"
    timeout 30 rabbitmqctl -q eval "application:load(rabbitmq_stomp), application:set_env(rabbitmq_stomp, tcp_listeners, $LISTENERS)." >/dev/null \
        || die "could not set the STOMP listener"
    timeout 120 rabbitmq-plugins -q enable rabbitmq_stomp >/dev/null || die "rabbitmq-plugins enable rabbitmq_stomp failed"
elif [ "${current// /}" != "{ok,${LISTENERS// /}}" ] || ! stomp_ok; then
    say "rabbitmq_stomp listens elsewhere ($current); moving it to $HOST:$PORT"
    timeout 60 rabbitmqctl -q eval "application:stop(rabbitmq_stomp), application:set_env(rabbitmq_stomp, tcp_listeners, $LISTENERS), application:start(rabbitmq_stomp)." >/dev/null \
        || die "could not restart rabbitmq_stomp on $HOST:$PORT"
fi

# 3. Keep it across restarts (the plugin is enabled now, so RabbitMQ knows the stomp.* keys).
wanted="# written by vmcloud scripts/rabbitmq-stomp.sh: keep port 61613 free for vmcloud
stomp.listeners.tcp.1 = $HOST:$PORT"
if [ ! -f "$CONF_FILE" ] || [ "$(cat "$CONF_FILE")" != "$wanted" ]; then
    mkdir -p "$CONF_DIR" && printf '%s\n' "$wanted" >"$CONF_FILE" || die "cannot write $CONF_FILE"
    say "wrote $CONF_FILE"
fi

# 4. Proof: a STOMP session, and RabbitMQ not on 61613.
for _ in $(seq 20); do
    stomp_ok && break
    sleep 0.5
done
stomp_ok || die "no STOMP session on $HOST:$PORT as guest/guest"
if command -v ss >/dev/null 2>&1 && ss -ltnp 2>/dev/null | grep -E "[:.]61613 " | grep -q beam; then
    die "RabbitMQ holds port 61613, which vmcloud's embedded broker needs"
fi
say "STOMP ready on $HOST:$PORT (login guest/guest)"
