#!/usr/bin/env bash
# The whole test suite, as CI runs it: install (idempotent), bring up RabbitMQ's STOMP plugin for the
# external-broker tests, lint, then pytest.  Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh || exit 1
if [ -f scripts/rabbitmq-stomp.sh ]; then
    bash scripts/rabbitmq-stomp.sh || echo "test.sh: RabbitMQ STOMP could not be enabled (external-broker tests will say so)"
fi

echo "== ruff"
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
echo "== mypy"
.venv/bin/mypy vmcloud guest_agent || exit 1

echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests"
    exit 1
fi
exit "$status"
