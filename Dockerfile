# kafka-infer: one static (musl) binary in a distroless image, non-root, no shell.
#   docker build -t kafka-infer .
#   docker run --rm kafka-infer run --help
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p runner \
 && cp target/x86_64-unknown-linux-musl/release/kafka-infer /kafka-infer

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /kafka-infer /kafka-infer
# Numeric (distroless' nonroot is 65532): kubelet can check runAsNonRoot only for a numeric user.
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/kafka-infer"]
CMD ["run", "--help"]
