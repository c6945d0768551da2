//! OpenTelemetry export (off by default): one span per record (kind consumer, from the fetch of
//! the record to the acknowledgement of its answer) with a child span per model call (kind
//! client), sent over OTLP/HTTP (protobuf, or JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`)
//! by the opentelemetry crates' batch processor. The exporter's HTTP requests run on our
//! hyper client, on the tokio runtime.

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::meta::Trace;

/// The exporter's HTTP transport: our hyper client, driven on the tokio runtime whatever thread
/// the batch processor calls from.
#[derive(Debug, Clone)]
struct HyperOnTokio {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HyperOnTokio {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let call = async move {
            let (parts, body) = request.into_parts();
            let call = async {
                let resp = client
                    .request(Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
            };
            let r = match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(r) => r,
                Err(_) => Err("timed out after 10s".into()),
            };
            // The SDK's own logs are compiled out: say here why spans are lost.
            match &r {
                Ok(resp) if !resp.status().is_success() => tracing::warn!(
                    status = resp.status().as_u16(),
                    "OpenTelemetry: the collector refused spans"
                ),
                Err(e) => tracing::warn!(error = %e, "OpenTelemetry: cannot export spans"),
                Ok(_) => {}
            }
            r
        };
        self.rt.spawn(call).await?
    }
}

/// The tracer: spans per record and per model call.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// A record's span, ended when dropped (when its answer is acknowledged, or it is abandoned).
#[derive(Debug)]
pub struct RecordSpan {
    span: opentelemetry_sdk::trace::Span,
}

/// A model call's span.
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl Tracing {
    /// `endpoint`: the OTLP/HTTP base URL (`/v1/traces` is added), or None to take
    /// OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT.
    pub fn start(endpoint: Option<&str>, service: &str) -> anyhow::Result<Self> {
        let client = HyperOnTokio {
            client: Client::builder(TokioExecutor::new())
                .build(crate::model::https_connector(None, false)),
            rt: tokio::runtime::Handle::current(),
        };
        let mut b = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client);
        if let Some(e) = endpoint {
            b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
        }
        // The builder's errors may quote the endpoint: never its userinfo.
        let exporter = b.build().map_err(|e| {
            let text = e.to_string();
            let text = match endpoint {
                Some(u) => text.replace(u, &crate::config::without_userinfo(u)),
                None => text,
            };
            anyhow::anyhow!("OTLP exporter: {text}")
        })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("kafka-infer");
        Ok(Self { provider, tracer })
    }

    /// Starts a record's span, the child of the record's trace context if it brought one
    /// (`trace.parent_id`), and makes `trace` carry the span's id.
    pub fn record(
        &self,
        trace: &mut Trace,
        topic: &str,
        partition: i32,
        offset: i64,
        request_id: &str,
    ) -> RecordSpan {
        let parent = match trace.parent_id {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(trace.trace_id),
                SpanId::from_bytes(p),
                TraceFlags::new(trace.flags),
                true,
                trace
                    .state
                    .as_deref()
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default(),
            )),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(format!("{topic} process"))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
                KeyValue::new("messaging.destination.partition.id", partition.to_string()),
                KeyValue::new("messaging.kafka.offset", offset),
                KeyValue::new("messaging.message.id", request_id.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        let sc = span.span_context();
        trace.trace_id = sc.trace_id().to_bytes();
        trace.span_id = sc.span_id().to_bytes();
        trace.flags = sc.trace_flags().to_u8();
        RecordSpan { span }
    }

    /// Flushes what is buffered (at shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry: flushing spans at shutdown");
        }
    }
}

impl RecordSpan {
    /// A model call's span under this record's: its id goes in the call's traceparent.
    pub fn call(&self, tracing: &Tracing, node: &str, what: &'static str) -> CallSpan {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        let span = tracing
            .tracer
            .span_builder(format!("{node} {what}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("kafka_infer.node", node.to_owned()),
                KeyValue::new("kafka_infer.call", what),
            ])
            .start_with_context(&tracing.tracer, &cx);
        CallSpan { span }
    }

    pub fn failed(&mut self, why: &str) {
        self.span.set_status(Status::Error {
            description: Cow::Owned(why.to_owned()),
        });
    }
}

impl CallSpan {
    /// The traceparent of this call: the record's trace, this span as the parent.
    pub fn traceparent(&self) -> String {
        let sc = self.span.span_context();
        crate::meta::traceparent(
            sc.trace_id().to_bytes(),
            sc.span_id().to_bytes(),
            sc.trace_flags().to_u8(),
        )
    }

    pub fn end(mut self, error: Option<&str>) {
        if let Some(e) = error {
            self.span.set_status(Status::Error {
                description: Cow::Owned(e.to_owned()),
            });
        }
        self.span.end();
    }
}
