# spire-init: the official spire-server binary (its image has no shell) plus sh and jq to script it.
FROM ghcr.io/spiffe/spire-server:1.13.3 AS spire

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends jq \
    && rm -rf /var/lib/apt/lists/*
COPY --from=spire /opt/spire/bin/spire-server /usr/local/bin/spire-server
COPY init.sh /usr/local/bin/securepay-spire-init
COPY entries.json /etc/spire/compose/entries.json
ENTRYPOINT ["/usr/local/bin/securepay-spire-init"]
