# The gateway as a container image: a release build, then a slim runtime image with a non-root
# user. Build from the repository root:
#   docker build -f packaging/docker/gateway.Dockerfile -t touchgate-gateway .
# Run (config, certificate and key in ./etc; state in a volume):
#   docker run -p 4433:4433/udp -v "$PWD/etc:/etc/touchgate:ro" -v touchgate-state:/var/lib/touchgate \
#     touchgate-gateway
# In gateway.toml: listen = "0.0.0.0:4433", database = "/var/lib/touchgate/gateway.db",
# audit_log = "-" (JSON lines on stdout, for the platform's log collector).

FROM rust:1-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p touchgate-gateway \
 && strip target/release/touchgate-gateway

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/touchgate --shell /usr/sbin/nologin touchgate \
 && install -d -o touchgate -g touchgate -m 0700 /var/lib/touchgate
COPY --from=build /src/target/release/touchgate-gateway /usr/bin/touchgate-gateway
USER 10001:10001
VOLUME ["/var/lib/touchgate"]
EXPOSE 4433/udp
ENV TOUCHGATE_LOG=info
ENTRYPOINT ["/usr/bin/touchgate-gateway"]
CMD ["serve", "--config", "/etc/touchgate/gateway.toml"]
