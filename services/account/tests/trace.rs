//! The account service's spans (SPEC §8) as OpenTelemetry sees them: `account.check_balance` is a
//! server span continuing the caller's `traceparent` from the gRPC metadata, with `cache.lookup`
//! and (on a miss) `db.balance_read` as its children; each consumed `payment.initiated` record is
//! settled in an `account.settle` consumer span continuing the trace in the record's headers, and
//! the outcome event it settles into carries THAT span's `traceparent`, so the outcome's consumers
//! stay in the payment's trace.
//!
//! Own test binary: it installs a GLOBAL subscriber (the services' log and trace layers, the W3C
//! propagator) that exports spans to memory. The service logic runs over the in-memory ports: the
//! spans, not the storage, are under test here (the real stores are covered by the other tests).
#![cfg(not(madsim))]

mod common;

use std::sync::{Arc, OnceLock};

use common::{Payment, dec};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use securepay_account::{AccountGrpc, SettlementConfig, Settler, Shutdown};
use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::Currency;
use securepay_kit::PeerSvid;
use securepay_kit::trace::names;
use securepay_memory::{MemoryBalanceCache, MemoryEventLog, MemoryLedgerStore, SeededIds, SimClock};
use securepay_ports::{Clock, ConsumedRecord, Outbox, Svid, TopicPartitionOffset};
use securepay_proto::account::v1::CheckBalanceRequest;
use securepay_proto::account::v1::account_service_server::AccountService;
use tracing_subscriber::layer::SubscriberExt;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The exporter every span of this test binary ends in.
fn spans() -> &'static (SdkTracerProvider, InMemorySpanExporter) {
    static INSTALLED: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        securepay_runtime::telemetry::install_propagator();
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(securepay_runtime::telemetry::log_and_trace_layers(&provider, std::io::sink));
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
        (provider, exporter)
    })
}

fn finished_in(trace: TraceId) -> Vec<SpanData> {
    let (provider, exporter) = spans();
    provider.force_flush().unwrap();
    exporter.get_finished_spans().unwrap().into_iter().filter(|s| s.span_context.trace_id() == trace).collect()
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn ledger_with(accounts: &[(AccountId, &str, &str)]) -> Arc<MemoryLedgerStore> {
    let ledger = MemoryLedgerStore::new();
    for (id, owner, opening) in accounts {
        ledger.open(*id, Subject::parse(owner).unwrap(), Currency::from_code("EUR").unwrap(), dec(opening)).unwrap();
    }
    Arc::new(ledger)
}

#[tokio::test]
async fn check_balance_continues_the_callers_trace_with_cache_and_db_children() {
    spans();
    let (alice, bob) = (AccountId::from_uuid(uuid::Uuid::new_v4()), AccountId::from_uuid(uuid::Uuid::new_v4()));
    let ledger = ledger_with(&[(alice, "alice", "50.00"), (bob, "bob", "0.00")]);
    let service = AccountGrpc::new(ledger, Arc::new(MemoryBalanceCache::new()), Arc::new(SimClock));

    let mut request = tonic::Request::new(CheckBalanceRequest {
        account_id: alice.to_string(),
        to_account: bob.to_string(),
        amount: "10.00".into(),
        currency: "EUR".into(),
    });
    let peer = Svid {
        spiffe_id: ServiceIdentity::PaymentService.spiffe_id().to_owned(),
        not_after: SimClock.now() + time::Duration::hours(1),
    };
    request.extensions_mut().insert(PeerSvid(peer));
    securepay_kit::with_subject(&mut request, &Subject::parse("alice").unwrap());
    request.metadata_mut().insert("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap());
    assert!(service.check_balance(request).await.unwrap().into_inner().sufficient);

    let trace = TraceId::from_hex(TRACE).unwrap();
    let spans = finished_in(trace);
    let handler = named(&spans, names::ACCOUNT_CHECK_BALANCE);
    assert_eq!(handler.len(), 1, "one handler span in the caller's trace: {spans:#?}");
    let handler = handler[0];
    assert_eq!(handler.span_kind, SpanKind::Server);
    assert_eq!(handler.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap(), "child of the caller's span");
    let id = handler.span_context.span_id();
    // Both accounts missed the empty cache: a lookup and a store read each, under the handler.
    for name in [names::CACHE_LOOKUP, names::DB_BALANCE_READ] {
        let children = named(&spans, name);
        assert_eq!(children.len(), 2, "{name} per account read: {spans:#?}");
        assert!(children.iter().all(|c| c.parent_span_id == id), "{name} is a child of the handler");
    }
}

#[tokio::test]
async fn each_settled_record_is_a_consumer_span_in_its_producers_trace() {
    spans();
    let (alice, bob) = (AccountId::from_uuid(uuid::Uuid::new_v4()), AccountId::from_uuid(uuid::Uuid::new_v4()));
    let ledger = ledger_with(&[(alice, "alice", "50.00"), (bob, "bob", "0.00")]);
    let settler = Settler {
        ledger: Arc::clone(&ledger),
        cache: Arc::new(MemoryBalanceCache::new()),
        dlq: Arc::new(MemoryEventLog::new()),
        ids: Arc::new(SeededIds),
        clock: Arc::new(SimClock),
        config: SettlementConfig::production(),
    };
    // `Payment::record` carries the producer's traceparent header, as the payment service's relay does.
    let payment = Payment::new(alice, bob, "12.00", "EUR", "alice");
    let outgoing = payment.record("payment.initiated");
    let producer = outgoing.headers[0].1.clone();
    let record = ConsumedRecord {
        position: TopicPartitionOffset { topic: outgoing.topic, partition: 0, offset: 7 },
        key: outgoing.key,
        payload: outgoing.payload,
        headers: outgoing.headers,
    };
    let round = settler.settle_round(&[record], &mut Shutdown::never()).await.unwrap();
    assert_eq!(round.settled.len(), 1);

    let parts: Vec<&str> = producer.split('-').collect();
    let spans = finished_in(TraceId::from_hex(parts[1]).unwrap());
    let settle = named(&spans, names::ACCOUNT_SETTLE);
    assert_eq!(settle.len(), 1, "one settle span in the producer's trace: {spans:#?}");
    assert_eq!(settle[0].span_kind, SpanKind::Consumer);
    assert_eq!(settle[0].parent_span_id, SpanId::from_hex(parts[2]).unwrap(), "child of the producer's span");
    let payment_id =
        settle[0].attributes.iter().find(|kv| kv.key.as_str() == "payment_id").map(|kv| kv.value.to_string());
    assert_eq!(payment_id, Some(payment.payment_id.to_string()));
}

#[tokio::test]
async fn each_outcome_event_carries_the_traceparent_of_the_span_that_settled_it() {
    spans();
    let (alice, bob) = (AccountId::from_uuid(uuid::Uuid::new_v4()), AccountId::from_uuid(uuid::Uuid::new_v4()));
    let ledger = ledger_with(&[(alice, "alice", "50.00"), (bob, "bob", "0.00")]);
    let settler = Settler {
        ledger: Arc::clone(&ledger),
        cache: Arc::new(MemoryBalanceCache::new()),
        dlq: Arc::new(MemoryEventLog::new()),
        ids: Arc::new(SeededIds),
        clock: Arc::new(SimClock),
        config: SettlementConfig::production(),
    };
    // One round, two payments of two traces; the second cannot be afforded (a `payment.failed`).
    let payments =
        [Payment::new(alice, bob, "12.00", "EUR", "alice"), Payment::new(alice, bob, "99.00", "EUR", "alice")];
    let traces: Vec<TraceId> =
        payments.iter().map(|_| TraceId::from_hex(&uuid::Uuid::new_v4().simple().to_string()).unwrap()).collect();
    let records: Vec<ConsumedRecord> = payments
        .iter()
        .zip(&traces)
        .enumerate()
        .map(|(offset, (payment, trace))| {
            let outgoing = payment.record("payment.initiated");
            ConsumedRecord {
                position: TopicPartitionOffset { topic: outgoing.topic, partition: 0, offset: offset as i64 },
                key: outgoing.key,
                payload: outgoing.payload,
                headers: vec![("traceparent".into(), format!("00-{trace}-{CALLER_SPAN}-01"))],
            }
        })
        .collect();
    let round = settler.settle_round(&records, &mut Shutdown::never()).await.unwrap();
    assert_eq!(round.settled.len(), 2);

    let outbox = ledger.unpublished(10).await.unwrap();
    let topics: Vec<&str> = outbox.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(topics, ["payment.completed", "payment.failed"]);
    for (event, trace) in outbox.iter().zip(&traces) {
        let settle = finished_in(*trace);
        let settle = named(&settle, names::ACCOUNT_SETTLE);
        assert_eq!(settle.len(), 1, "one settle span in trace {trace}");
        let expected = format!("00-{trace}-{}-01", settle[0].span_context.span_id());
        let carried = event.headers.iter().find(|(name, _)| name == "traceparent").map(|(_, value)| value.as_str());
        assert_eq!(carried, Some(expected.as_str()), "{} continues its own settle span", event.topic);
    }
}
