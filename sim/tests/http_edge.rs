//! The HTTP edge of `securepay_sim::http`: an axum router served from its own node, reached by a
//! client node over the simulated network — so partitions and kills of the gateway hit clients.
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
use securepay_ports::PortError;
use securepay_sim::http::{HTTP_PORT, RemoteHttp, serve_router};
use securepay_sim::remote::ServerFaults;
use securepay_sim::run::{self, Checker};
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
