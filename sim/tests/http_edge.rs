//! The HTTP edge of `securepay_sim::http`: an axum router served from its own node, reached by a
//! client node over the simulated network — so partitions and kills of the gateway hit clients;
//! and the production gateway router on such a node: every `securepay_sim::edge::Hostile` probe
//! gets its documented refusal, and the per-IP rate limit sees each client's own address; a
//! gateway whose node clock is skewed past the JWT leeway refuses a token valid on the true clock,
//! and accepts it within the leeway.
//!
//! Run: `MADSIM_TEST_SEED=1 MADSIM_TEST_NUM=5 cargo sim --test http_edge`.
#![cfg(madsim)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use madsim::net::NetSim;
use madsim::runtime::Handle;
use rust_decimal::Decimal;
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_gateway::backends::CallInterceptor;
use securepay_gateway::config::RateQuota;
use securepay_gateway::{AppState, Backends};
use securepay_ports::PortError;
use securepay_sim::clock::SkewedClock;
use securepay_sim::edge::{self, DevIssuer, Hostile};
use securepay_sim::http::{HTTP_PORT, RemoteHttp, serve_router};
use securepay_sim::remote::ServerFaults;
use securepay_sim::run::{self, Checker};
use securepay_sim::workload::Pay;
use tokio::time::sleep;

const TEST: &str = "http_edge";
const DOWN: PortError = PortError::Unavailable { component: "gateway" };

#[madsim::test]
async fn a_router_on_its_own_node_is_reached_over_the_network_and_partitions_and_kills_hit_it() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let handle = Handle::current();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), HTTP_PORT);
    // Requests the router handled, over all lifetimes of the node.
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    let gateway = handle
        .create_node()
        .name("gateway")
        .ip(addr.ip())
        .init(move || {
            let counter = Arc::clone(&counter);
            let router = Router::new().route(
                "/echo",
                post(move |body: String| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, format!("echo:{body}"))
                    }
                }),
            );
            serve_router(addr, router, ServerFaults::new())
        })
        .build();
    let client = handle.create_node().name("client").ip(IpAddr::V4(Ipv4Addr::new(10, 3, 0, 1))).build();
    let http = client.spawn(RemoteHttp::connect(addr, Duration::from_millis(500))).await.unwrap();
    let echo = |text: &str| Request::post("/echo").body(text.as_bytes().to_vec()).expect("a valid request");

    let send = |request: Request<Vec<u8>>| {
        let http = http.clone();
        client.spawn(async move { http.send(request).await.map(|r| (r.status, String::from_utf8(r.body).unwrap())) })
    };
    let ok = send(echo("a")).await.unwrap();
    check.check(ok == Ok((StatusCode::CREATED, "echo:a".into())), || format!("first request: {ok:?}"));
    let missing = send(Request::get("/nowhere").body(vec![]).unwrap()).await.unwrap();
    check.check(matches!(missing, Ok((StatusCode::NOT_FOUND, _))), || format!("unknown route: {missing:?}"));

    let net = NetSim::current();
    net.clog_link(client.id(), gateway.id());
    let cut = send(echo("b")).await.unwrap();
    check.check(cut == Err(DOWN), || format!("across a partition: {cut:?}"));
    net.unclog_link(client.id(), gateway.id());

    // The reply is lost: the request was handled, the client cannot know.
    net.clog_link(gateway.id(), client.id());
    let before = handled.load(Ordering::SeqCst);
    let lost = send(echo("c")).await.unwrap();
    check.check(lost == Err(DOWN) && handled.load(Ordering::SeqCst) == before + 1, || {
        format!("reply lost: {lost:?}, handled {} → {}", before, handled.load(Ordering::SeqCst))
    });
    net.unclog_link(gateway.id(), client.id());

    handle.kill(gateway.id());
    let killed = send(echo("d")).await.unwrap();
    check.check(killed == Err(DOWN), || format!("gateway killed: {killed:?}"));
    handle.restart(gateway.id());
    sleep(Duration::from_millis(50)).await;
    let back = send(echo("e")).await.unwrap();
    check.check(back == Ok((StatusCode::CREATED, "echo:e".into())), || format!("after the restart: {back:?}"));
    run::print_line(&format!(
        "{TEST} seed={} handled={} checks={}",
        run::seed(),
        handled.load(Ordering::SeqCst),
        check.checks()
    ));
}

/// The IP quota of the hostile-probe test: a burst a little above the probes, refilled slowly.
const IP_BURST: u32 = 12;

#[madsim::test]
async fn the_gateway_refuses_every_hostile_probe_and_limits_each_client_ip() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let handle = Handle::current();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), HTTP_PORT);
    let _gateway = handle
        .create_node()
        .name("gateway")
        .ip(addr.ip())
        .init(move || async move {
            let mut config = edge::gateway_config();
            config.rate_limits.ip = RateQuota {
                per_second: std::num::NonZeroU32::new(1).expect("non-zero"),
                burst: std::num::NonZeroU32::new(IP_BURST).expect("non-zero"),
            };
            // No backend listens there: every probe must be refused before any backend call.
            let nowhere = tonic::transport::Endpoint::from_static("http://10.9.9.9:50051").connect_lazy();
            let backends = Backends::new(securepay_gateway::Channels::one(nowhere), CallInterceptor::none());
            let state = AppState::new(config, DevIssuer::new().authenticator(), backends, None);
            serve_router(addr, securepay_gateway::router(state), ServerFaults::new()).await;
        })
        .build();
    let client = |host: u8| {
        handle.create_node().name(format!("client-{host}")).ip(IpAddr::V4(Ipv4Addr::new(10, 3, 0, host))).build()
    };
    let (a, b) = (client(1), client(2));
    let issuer = DevIssuer::new();
    let subject = Subject::parse("user-1").expect("a subject");
    let currency = Currency::from_code("EUR").expect("EUR");
    let pay = Pay {
        subject: subject.clone(),
        key: IdempotencyKey::parse("probe").expect("a key"),
        from: AccountId::from_uuid(uuid::Uuid::from_u128(1)),
        to: AccountId::from_uuid(uuid::Uuid::from_u128(2)),
        amount: Amount::new(Decimal::new(1050, 2), currency, AmountPolicy::default()).expect("an amount"),
        unaffordable: false,
        replay_conflicting: false,
        concurrent_copies: 1,
    };

    let results = a
        .spawn(async move {
            let http = RemoteHttp::connect(addr, Duration::from_secs(11)).await;
            let valid = issuer.token(&pay.subject);
            let mut seen = Vec::new();
            for (n, kind) in Hostile::ALL.into_iter().enumerate() {
                let probe = kind.probe(&issuer, &valid, &pay, &format!("hostile-{n}"), &format!("a-{n}"));
                let response = http.send(probe.request).await.expect("the gateway answers");
                seen.push((kind, response.status, edge::problem_code(&response)));
            }
            // Past the burst: the same client's address is refused with 429 and Retry-After.
            let mut throttled_at = None;
            for n in Hostile::ALL.len()..30 {
                let probe = Hostile::NoToken.probe(&issuer, &valid, &pay, "hostile-x", &format!("a-{n}"));
                let response = http.send(probe.request).await.expect("the gateway answers");
                if response.status == StatusCode::TOO_MANY_REQUESTS {
                    let retry_after = response.headers.get("retry-after").is_some();
                    throttled_at = Some((n + 1, edge::problem_code(&response), retry_after));
                    break;
                }
            }
            (seen, throttled_at)
        })
        .await
        .expect("client a finishes");
    let (seen, throttled_at) = results;
    for (kind, status, code) in &seen {
        let (want_status, want_code) = kind.expected();
        check.check(*status == want_status && code.as_deref() == Some(want_code), || {
            format!("{}: {status} {code:?}, expected {want_status} {want_code}", kind.name())
        });
    }
    check.check(
        matches!(&throttled_at, Some((n, Some(code), true)) if *n <= IP_BURST as usize + 2 && code == "rate_limited"),
        || format!("client a past its IP burst of {IP_BURST}: {throttled_at:?}"),
    );
    // Another address has its own bucket.
    let other = b
        .spawn(async move {
            let http = RemoteHttp::connect(addr, Duration::from_secs(11)).await;
            let request = edge::create_payment("b-0", None, "hostile-b", b"{}".to_vec());
            http.send(request).await.map(|r| (r.status, edge::problem_code(&r)))
        })
        .await
        .expect("client b finishes");
    check.check(other == Ok((StatusCode::UNAUTHORIZED, Some("unauthorized".into()))), || {
        format!("client b, another address: {other:?}")
    });
    run::print_line(&format!("{TEST}/gateway seed={} probes={} checks={}", run::seed(), seen.len(), check.checks()));
}

#[madsim::test]
async fn a_gateway_whose_clock_is_skewed_past_the_leeway_refuses_fresh_tokens() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let handle = Handle::current();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), HTTP_PORT);
    let clock = SkewedClock::new();
    let node_clock = clock.clone();
    let _gateway = handle
        .create_node()
        .name("gateway")
        .ip(addr.ip())
        .init(move || {
            let node_clock = node_clock.clone();
            async move {
                let nowhere = tonic::transport::Endpoint::from_static("http://10.9.9.9:50051").connect_lazy();
                let backends = Backends::new(securepay_gateway::Channels::one(nowhere), CallInterceptor::none());
                let auth = DevIssuer::new().authenticator_on(Arc::new(node_clock));
                let state = AppState::new(edge::gateway_config(), auth, backends, None);
                serve_router(addr, securepay_gateway::router(state), ServerFaults::new()).await;
            }
        })
        .build();
    let client = handle.create_node().name("client").ip(IpAddr::V4(Ipv4Addr::new(10, 3, 0, 1))).build();
    let leeway_ms = i64::try_from(edge::gateway_config().jwt.leeway_seconds * 1000).expect("small");
    // Behind past the leeway (nbf in its future), behind within it, ahead, and healed. Past
    // authentication, the malformed id is refused 400 before any backend call.
    let cases = [
        (-leeway_ms - 30_000, 401, "unauthorized"),
        (-leeway_ms + 10_000, 400, "invalid_payment_id"),
        (90_000, 400, "invalid_payment_id"),
        (0, 400, "invalid_payment_id"),
    ];
    let seen = client
        .spawn(async move {
            let http = RemoteHttp::connect(addr, Duration::from_secs(11)).await;
            let subject = Subject::parse("user-1").expect("a subject");
            let mut seen = Vec::new();
            for (n, (offset_ms, _, _)) in cases.iter().enumerate() {
                clock.set_offset_ms(*offset_ms);
                // Minted now on the true clock, as a client does.
                let token = DevIssuer::new().token(&subject);
                let response = http.send(edge::get_payment(&format!("s-{n}"), &token, "not-a-uuid")).await;
                seen.push(response.map(|r| (r.status.as_u16(), edge::problem_code(&r))));
            }
            seen
        })
        .await
        .expect("the client finishes");
    for ((offset_ms, status, code), answer) in cases.iter().zip(&seen) {
        check.check(matches!(answer, Ok((s, Some(c))) if s == status && c == code), || {
            format!("gateway clock {offset_ms} ms off: {answer:?}, expected {status} {code}")
        });
    }
    run::print_line(&format!("{TEST}/skew seed={} checks={}", run::seed(), check.checks()));
}
