#!/bin/sh
# spire-init (compose.yaml): prepares the SPIRE agent's bootstrap and registers the four SecurePay
# workloads. Runs once per `docker compose up`, after spire-server is healthy, before spire-agent starts.
# Idempotent: entries that already exist are kept, a fresh single-use join token is written each time.
set -eu

SOCKET="${SPIRE_SERVER_SOCKET:-/tmp/spire-server/private/api.sock}"
BOOTSTRAP_DIR="${BOOTSTRAP_DIR:-/run/spire/bootstrap}"
ENTRIES="${ENTRIES:-/etc/spire/compose/entries.json}"
# The agent's alias: every workload entry in entries.json names it as parent_id.
AGENT_ID="${AGENT_ID:-spiffe://securepay.dev/node/compose-agent}"
TOKEN_TTL_SECONDS=600

mkdir -p "$BOOTSTRAP_DIR"

# 1. The server's CA bundle, so the agent authenticates the server (no insecure_bootstrap).
spire-server bundle show -socketPath "$SOCKET" -format pem > "$BOOTSTRAP_DIR/bundle.pem.tmp"
mv "$BOOTSTRAP_DIR/bundle.pem.tmp" "$BOOTSTRAP_DIR/bundle.pem"

# 2. A single-use join token aliased to AGENT_ID. An agent that already attested ignores it and
#    keeps using the SVID in its data volume.
spire-server token generate -socketPath "$SOCKET" -spiffeID "$AGENT_ID" -ttl "$TOKEN_TTL_SECONDS" -output json \
    | jq -er '.value' > "$BOOTSTRAP_DIR/join-token.tmp"
mv "$BOOTSTRAP_DIR/join-token.tmp" "$BOOTSTRAP_DIR/join-token"

# 3. The workload entries. BatchCreateEntry answers per entry: OK (0) or AlreadyExists (6) are fine,
#    anything else fails this container and so keeps the agent and the services from starting.
result="$(spire-server entry create -socketPath "$SOCKET" -data "$ENTRIES" -output json || true)"
printf '%s\n' "$result" | jq -e '[.results[] | (.status.code // 0)] | length > 0 and all(. == 0 or . == 6)' > /dev/null \
    || { echo "spire-init: creating registration entries failed: $result" >&2; exit 1; }
printf '%s\n' "$result" | jq -r '.results[] | "spire-init: entry \(.entry.spiffe_id.path // "?") status \(.status.code // 0)"'
echo "spire-init: bootstrap bundle, join token and $(jq '.entries | length' "$ENTRIES") registration entries ready"
