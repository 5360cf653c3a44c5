//! The operator process wiring: `controller::run` (kube-runtime Controller, watches, metrics
//! endpoint) against the mocked API server, which answers the watches as long polls. Proves
//! that what the watch delivers is reconciled, including deletions.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use faultline_operator::controller::{self, RunOptions};
use faultline_operator::crd::Phase;
use serde_json::json;
use support::*;

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_controller_reconciles_what_the_watches_deliver() {
    let c = Cluster::new();
    c.create_migration("first", json!({"source": {"pod": "nope"}}));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let operator = tokio::spawn(controller::run(
        c.client.clone(),
        fast_config(),
        RunOptions {
            metrics_addr,
            leader_election: false,
            lease_name: "faultline-operator".into(),
            lease_namespace: NS.into(),
            identity: "test".into(),
            lease_duration: Duration::from_secs(15),
            lease_grace: Duration::from_secs(5),
            workers: 4,
        },
    ));

    let failed = |name: &str| {
        c.migration(name)
            .and_then(|m| m.phase())
            .is_some_and(|p| p == Phase::Failed)
    };
    // Listed at start and reconciled: its source pod does not exist.
    wait_for(
        "the first migration to fail",
        Duration::from_secs(30),
        || failed("first"),
    )
    .await;
    // Created later: delivered by the watch.
    c.create_migration("second", json!({"source": {"pod": "nope"}}));
    wait_for(
        "the second migration to fail",
        Duration::from_secs(30),
        || failed("second"),
    )
    .await;
    assert_eq!(
        c.migration("second").and_then(|m| m.metadata.finalizers),
        Some(vec!["faultline.dev/migration".to_string()])
    );
    // Deleted: the controller releases its finalizer and the object goes.
    c.delete_migration("second");
    wait_for(
        "the second migration to go",
        Duration::from_secs(30),
        || c.migration("second").is_none(),
    )
    .await;
    assert!(c.migration("first").is_some());

    // The metrics endpoint counts what happened.
    let text = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(metrics_addr)
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("answer");
        out
    };
    assert!(
        text.contains("faultline_operator_migrations_finished_total{result=\"failed\"} 2"),
        "{text}"
    );
    assert!(text.contains("faultline_operator_leader 1"), "{text}");
    assert!(!operator.is_finished(), "the controller keeps running");
    operator.abort();
}
