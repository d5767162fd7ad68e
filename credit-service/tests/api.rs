//! The credit service's API, end to end: the real binary on a free port, each scenario once on a fresh
//! SQLite file and once on a fresh PostgreSQL database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod common;

use std::time::{Duration, Instant};

use common::{Db, Service, ADMIN_TOKEN, SERVICE_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::Executor;

on_both_backends!(
    accounts_and_idempotent_top_ups,
    commit_in_full,
    partial_commit_returns_the_rest,
    release_returns_the_hold,
    replayed_request_id_holds_once,
    short_balance_is_402,
    concurrent_reservations_never_overdraw,
    sweeper_expires_old_reservations,
    a_commit_after_expiry_still_charges,
    tokens_guard_each_call,
    bad_input_changes_nothing,
    restart_keeps_the_ledger,
    sigterm_exits_cleanly,
    sigterm_lets_in_flight_requests_finish,
    database_trouble_is_503,
    clients_that_hang_up_break_nothing,
);

async fn accounts_and_idempotent_top_ups(db: Db) {
    let svc = Service::start(&db);
    let (status, body) = svc.admin(Method::PUT, "/v1/accounts/acme", None).await;
    assert_eq!((status, body), (StatusCode::CREATED, json!({ "account": "acme", "balance": 0 })));

    let (status, first) = svc.top_up("acme", 100, "invoice-1").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["balance"], 100);
    assert!(first["transaction_id"].is_i64(), "{first}");

    // The same reference again: the first result, nothing added.
    let (status, again) = svc.top_up("acme", 100, "invoice-1").await;
    assert_eq!((status, &again), (StatusCode::OK, &first));
    // Even with another amount: the reference identifies the top-up.
    let (status, again) = svc.top_up("acme", 999, "invoice-1").await;
    assert_eq!((status, &again), (StatusCode::OK, &first));

    let (status, second) = svc.top_up("acme", 50, "invoice-2").await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["balance"], 150);

    // References are per account.
    svc.funded_account("other", 0).await;
    let (status, body) = svc.top_up("other", 7, "invoice-1").await;
    assert_eq!((status, &body["balance"]), (StatusCode::CREATED, &json!(7)), "{body}");

    // Creating again changes nothing and says so with 200.
    let (status, body) = svc.admin(Method::PUT, "/v1/accounts/acme", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "account": "acme", "balance": 150 })));

    let (status, body) = svc.top_up("nobody", 5, "invoice-1").await;
    assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("account_not_found")), "{body}");

    let (status, body) = svc.gateway(Method::GET, "/v1/accounts/acme", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "account": "acme", "balance": 150, "held": 0 })));
    assert_eq!(svc.journal("acme").await, [("topup".into(), 100, 100), ("topup".into(), 50, 150)]);
    let rows = svc.transactions("acme").await;
    assert_eq!(rows[0]["reference"], "invoice-1");
    assert!(rows[0].get("reservation_id").is_none(), "{}", rows[0]);
    assert!(rows[0]["created_at"].as_str().unwrap().ends_with('Z'), "{}", rows[0]);

    // Paging: ids above `after`, at most `limit`.
    let first_id = rows[0]["id"].as_i64().unwrap();
    let path = format!("/v1/accounts/acme/transactions?after={first_id}&limit=1");
    let (status, page) = svc.admin(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["transactions"].as_array().unwrap().as_slice(), &rows[1..]);
}

async fn commit_in_full(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let (status, body) = svc.reserve("acme", 30, "req-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["balance"], 70, "what is left to spend after the hold");
    let id = body["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(svc.balance("acme").await, (70, 30));

    let (status, body) = svc.commit(&id, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 30, "balance": 70 })));
    // Again, with or without an amount: the same answer, nothing changes.
    let (status, body) = svc.commit(&id, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 30, "balance": 70 })));
    let (status, body) = svc.commit(&id, Some(5)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 30, "balance": 70 })));
    // An empty JSON object is the same as no body.
    let (status, body) =
        svc.call(Method::POST, &format!("/v1/reservations/{id}/commit"), Some(SERVICE_TOKEN), Some("{}")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 30, "balance": 70 })));

    assert_eq!(svc.balance("acme").await, (70, 0));
    assert_eq!(
        svc.journal("acme").await,
        [("topup".into(), 100, 100), ("reserve".into(), -30, 70), ("commit".into(), 0, 70)]
    );
    let rows = svc.transactions("acme").await;
    assert_eq!((&rows[1]["reservation_id"], &rows[2]["reservation_id"]), (&json!(id), &json!(id)));
}

async fn partial_commit_returns_the_rest(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let id = svc.hold("acme", 30, "req-1").await;

    // More than reserved: refused, nothing written.
    let (status, body) = svc.commit(&id, Some(31)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!((&body["error"], &body["reserved"]), (&json!("amount_exceeds_reservation"), &json!(30)));
    assert_eq!(svc.balance("acme").await, (70, 30));

    let (status, body) = svc.commit(&id, Some(12)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 12, "balance": 88 })));
    let (status, body) = svc.commit(&id, Some(30)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 12, "balance": 88 })));
    assert_eq!(svc.balance("acme").await, (88, 0));

    // Zero is a charge too: the upstream said the call was free.
    let free = svc.hold("acme", 8, "req-2").await;
    let (status, body) = svc.commit(&free, Some(0)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 0, "balance": 88 })));

    assert_eq!(
        svc.journal("acme").await,
        [
            ("topup".into(), 100, 100),
            ("reserve".into(), -30, 70),
            ("commit".into(), 18, 88),
            ("reserve".into(), -8, 80),
            ("commit".into(), 8, 88),
        ]
    );
}

async fn release_returns_the_hold(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let id = svc.hold("acme", 30, "req-1").await;

    let (status, body) = svc.release(&id).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "released": 30, "balance": 100 })));
    let (status, body) = svc.release(&id).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "released": 30, "balance": 100 })));
    assert_eq!(svc.balance("acme").await, (100, 0));

    let (status, body) = svc.commit(&id, None).await;
    assert_eq!((status, &body["error"]), (StatusCode::CONFLICT, &json!("reservation_released")), "{body}");

    let committed = svc.hold("acme", 10, "req-2").await;
    assert_eq!(svc.commit(&committed, None).await.0, StatusCode::OK);
    let (status, body) = svc.release(&committed).await;
    assert_eq!((status, &body["error"]), (StatusCode::CONFLICT, &json!("reservation_committed")), "{body}");

    for unknown in ["res_00000000000000000000000000000000", "nonsense", "x%20y"] {
        let (status, body) = svc.release(unknown).await;
        assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("reservation_not_found")), "{body}");
        let (status, body) = svc.commit(unknown, None).await;
        assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("reservation_not_found")), "{body}");
    }

    assert_eq!(
        svc.journal("acme").await,
        [
            ("topup".into(), 100, 100),
            ("reserve".into(), -30, 70),
            ("release".into(), 30, 100),
            ("reserve".into(), -10, 90),
            ("commit".into(), 0, 90),
        ]
    );
}

async fn replayed_request_id_holds_once(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    svc.funded_account("globex", 100).await;
    let first = svc.hold("acme", 10, "req-1").await;

    // A retry, even one that asks for more: the first reservation, no second hold.
    for amount in [10, 50, 1000] {
        let (status, body) = svc.reserve("acme", amount, "req-1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({ "reservation_id": first, "balance": 90 }));
    }
    assert_eq!(svc.balance("acme").await, (90, 10));

    // Still the same reservation after it was committed.
    assert_eq!(svc.commit(&first, None).await.0, StatusCode::OK);
    let (status, body) = svc.reserve("acme", 10, "req-1").await;
    assert_eq!((status, &body["reservation_id"]), (StatusCode::OK, &json!(first)));

    // Request ids are scoped to the account.
    let other = svc.hold("globex", 10, "req-1").await;
    assert_ne!(other, first);
    assert_eq!(svc.balance("globex").await, (90, 10));

    // Replays racing each other still hold once.
    let body = json!({ "account": "acme", "amount": 5, "request_id": "req-race", "route": "/api" });
    let results = reserve_concurrently(&svc, vec![body; 10]).await;
    let ids: std::collections::BTreeSet<_> = results.iter().map(|(_, b)| b["reservation_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{results:?}");
    assert_eq!(results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(), 1, "{results:?}");
    assert_eq!(svc.balance("acme").await, (85, 5));
    assert_eq!(svc.journal("acme").await.len(), 4);
}

async fn short_balance_is_402(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 5).await;
    let (status, body) = svc.reserve("acme", 10, "req-1").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(
        (&body["error"], &body["balance"], &body["required"]),
        (&json!("insufficient_credits"), &json!(5), &json!(10))
    );
    assert!(body["message"].is_string(), "{body}");
    // Refused, so not remembered: the same request id may reserve once the account can afford it.
    let (status, body) = svc.reserve("acme", 5, "req-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["balance"], 0);

    let (status, body) = svc.reserve("nobody", 1, "req-1").await;
    assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("account_not_found")), "{body}");
    assert_eq!(svc.journal("acme").await, [("topup".into(), 5, 5), ("reserve".into(), -5, 0)]);
}

async fn concurrent_reservations_never_overdraw(db: Db) {
    let svc = Service::start(&db);
    // A second instance on the same database, as when several gateways' services share one ledger
    // (and, on SQLite, two processes share the file: the busy timeout, not an error, settles who
    // writes).
    let twin = Service::start(&db);
    svc.funded_account("acme", 20).await;
    let bodies: Vec<_> = (0..50)
        .map(|i| json!({ "account": "acme", "amount": 1, "request_id": format!("req-{i}"), "route": "/api" }))
        .collect();
    let (even, odd): (Vec<_>, Vec<_>) = bodies.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let strip = |half: Vec<(usize, serde_json::Value)>| half.into_iter().map(|(_, b)| b).collect::<Vec<_>>();
    let (a, b) = tokio::join!(reserve_concurrently(&svc, strip(even)), reserve_concurrently(&twin, strip(odd)));
    let statuses: Vec<StatusCode> = a.into_iter().chain(b).map(|(s, _)| s).collect();
    let won = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::PAYMENT_REQUIRED).count();
    assert_eq!((won, refused), (20, 30), "{statuses:?}");
    assert_eq!(svc.balance("acme").await, (0, 20));
    let journal = svc.journal("acme").await;
    assert_eq!(journal.len(), 21);
    assert!(journal[1..].iter().all(|(kind, amount, after)| kind == "reserve" && *amount == -1 && *after >= 0));
}

async fn sweeper_expires_old_reservations(db: Db) {
    let svc = Service::start_with(&db, &["--reservation-ttl-seconds", "1", "--sweep-interval-seconds", "1"]);
    svc.funded_account("acme", 100).await;
    let stale = svc.hold("acme", 30, "req-1").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while svc.balance("acme").await != (100, 0) {
        assert!(Instant::now() < deadline, "not expired within 10 s; log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Releasing an expired reservation is a no-op that succeeds: the gateway's release after a slow
    // upstream must not fail.
    let (status, body) = svc.release(&stale).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "released": 30, "balance": 100 })));
    assert_eq!(
        svc.journal("acme").await,
        [("topup".into(), 100, 100), ("reserve".into(), -30, 70), ("expire".into(), 30, 100)]
    );
}

/// A request that outlived its hold (a client trickling its body past the TTL) was still served:
/// its commit charges, from what the balance holds now, never more than it holds.
async fn a_commit_after_expiry_still_charges(db: Db) {
    let svc = Service::start_with(&db, &["--reservation-ttl-seconds", "1", "--sweep-interval-seconds", "1"]);
    svc.funded_account("acme", 100).await;
    let late = svc.hold("acme", 30, "req-1").await;
    let broke = svc.hold("acme", 70, "req-2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while svc.balance("acme").await != (100, 0) {
        assert!(Instant::now() < deadline, "not expired within 10 s; log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = svc.commit(&late, Some(20)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 20, "balance": 80 })));
    // Spent elsewhere meanwhile: a late commit takes what is left, and the balance stays >= 0.
    let spent = svc.hold("acme", 75, "req-3").await;
    assert_eq!(svc.commit(&spent, None).await.0, StatusCode::OK);
    let (status, body) = svc.commit(&broke, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 5, "balance": 0 })));
    let (status, body) = svc.commit(&late, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 20, "balance": 0 })), "a retry charges once");
    let journal = svc.journal("acme").await;
    assert_eq!(journal.iter().map(|(_, amount, _)| amount).sum::<i64>(), 0, "the journal sums to the balance");
    assert_eq!(journal.last(), Some(&("commit".into(), -5, 0)));
}

async fn tokens_guard_each_call(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let top_up = r#"{"amount": 5, "reference": "t"}"#;
    let reserve = r#"{"account": "acme", "amount": 5, "request_id": "r", "route": "/api"}"#;
    let refused = [
        (Method::POST, "/v1/accounts/acme/credits", None, Some(top_up)),
        (Method::POST, "/v1/accounts/acme/credits", Some("wrong"), Some(top_up)),
        (Method::POST, "/v1/accounts/acme/credits", Some(SERVICE_TOKEN), Some(top_up)),
        (Method::PUT, "/v1/accounts/new", Some(SERVICE_TOKEN), None),
        (Method::GET, "/v1/accounts/acme/transactions", Some(SERVICE_TOKEN), None),
        (Method::POST, "/v1/reservations", Some(ADMIN_TOKEN), Some(reserve)),
        (Method::POST, "/v1/reservations", None, Some(reserve)),
        (Method::GET, "/v1/accounts/acme", Some("test-service-token-of-at-least-32-bytesX"), None),
        (Method::GET, "/v1/accounts/acme", Some(""), None),
    ];
    for (method, path, token, body) in refused {
        let (status, json) = svc.call(method.clone(), path, token, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}: {json}");
        assert_eq!(json["error"], "unauthorized", "{json}");
    }
    // The scheme is case-insensitive; the header names the scheme to use.
    let response = svc
        .http
        .get(format!("{}/v1/accounts/acme", svc.base))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let response = svc
        .http
        .get(format!("{}/v1/accounts/acme", svc.base))
        .header("authorization", format!("bearer {SERVICE_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Reading a balance takes either token.
    for token in [SERVICE_TOKEN, ADMIN_TOKEN] {
        let (status, _) = svc.call(Method::GET, "/v1/accounts/acme", Some(token), None).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(svc.journal("acme").await.len(), 1, "a refused call wrote something");
}

async fn bad_input_changes_nothing(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let held = svc.hold("acme", 10, "req-held").await;
    let before = svc.transactions("acme").await;
    let long = "x".repeat(257);
    let long_account = "a".repeat(129);
    let commit = format!("/v1/reservations/{held}/commit");
    let cases: Vec<(Method, String, &str, String, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            "not json".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (Method::POST, "/v1/reservations".into(), SERVICE_TOKEN, "".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        (Method::POST, "/v1/reservations".into(), SERVICE_TOKEN, "[]".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            r#"{"account":"acme","amount":1,"request_id":"r","route":"/","extra":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            r#"{"account":"acme","amount":"1","request_id":"r","route":"/"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            r#"{"account":"acme","amount":1.5,"request_id":"r","route":"/"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            r#"{"account":"acme","amount":99999999999999999999,"request_id":"r","route":"/"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 0, "r", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", -5, "r", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 1_000_000_000_001, "r", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 1, &long, "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 1, "", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 1, "a\nb", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("acme", 1, "r", &long),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body("ac me", 1, "r", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            reserve_body(&long_account, 1, "r", "/"),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            commit.clone(),
            SERVICE_TOKEN,
            r#"{"amount":-1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            commit.clone(),
            SERVICE_TOKEN,
            r#"{"charge":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            commit.clone(),
            SERVICE_TOKEN,
            r#"{"amount":11}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount_exceeds_reservation",
        ),
        (
            Method::POST,
            format!("/v1/reservations/{held}/release"),
            SERVICE_TOKEN,
            r#"{"x":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/accounts/acme/credits".into(),
            ADMIN_TOKEN,
            r#"{"amount":0,"reference":"a"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/accounts/acme/credits".into(),
            ADMIN_TOKEN,
            r#"{"amount":1000000000001,"reference":"a"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/accounts/acme/credits".into(),
            ADMIN_TOKEN,
            format!(r#"{{"amount":1,"reference":"{long}"}}"#),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::POST,
            "/v1/accounts/acme/credits".into(),
            ADMIN_TOKEN,
            r#"{"amount":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::PUT,
            "/v1/accounts/acme".into(),
            ADMIN_TOKEN,
            r#"{"balance":1000}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::PUT,
            format!("/v1/accounts/{long_account}"),
            ADMIN_TOKEN,
            "".into(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (Method::PUT, "/v1/accounts/a%2Fb".into(), ADMIN_TOKEN, "".into(), StatusCode::BAD_REQUEST, "invalid_field"),
        (
            Method::GET,
            "/v1/accounts/acme/transactions?limit=0".into(),
            ADMIN_TOKEN,
            "".into(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Method::GET,
            "/v1/accounts/acme/transactions?after=x".into(),
            ADMIN_TOKEN,
            "".into(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            format!(r#"{{"pad":"{}"}}"#, "x".repeat(20_000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (Method::GET, "/v1/nothing".into(), SERVICE_TOKEN, "".into(), StatusCode::NOT_FOUND, "not_found"),
        (
            Method::DELETE,
            "/v1/reservations".into(),
            SERVICE_TOKEN,
            "".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, token, body, want_status, want_code) in cases {
        let (status, json) = svc.call(method.clone(), &path, Some(token), Some(&body)).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(status, want_status, "{method} {path} {shown}: {json}");
        assert_eq!(json["error"], want_code, "{method} {path} {shown}: {json}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
    }
    assert_eq!(svc.transactions("acme").await, before, "a refused call wrote to the journal");
    assert_eq!(svc.balance("acme").await, (90, 10));
    // The reservation survived every bad call and still commits.
    assert_eq!(svc.commit(&held, None).await, (StatusCode::OK, json!({ "charged": 10, "balance": 90 })));
}

fn reserve_body(account: &str, amount: i64, request_id: &str, route: &str) -> String {
    json!({ "account": account, "amount": amount, "request_id": request_id, "route": route }).to_string()
}

async fn restart_keeps_the_ledger(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let held = svc.hold("acme", 30, "req-1").await;
    let journal = svc.journal("acme").await;
    assert!(svc.terminate().success());

    // Migrations find the schema in place; the ledger and the open reservation are still there.
    let svc = Service::start(&db);
    assert_eq!(svc.journal("acme").await, journal);
    assert_eq!(svc.balance("acme").await, (70, 30));
    let (status, body) = svc.top_up("acme", 100, "initial-acme").await;
    assert_eq!((status, &body["balance"]), (StatusCode::OK, &json!(100)), "the reference is remembered: {body}");
    assert_eq!(svc.commit(&held, Some(20)).await, (StatusCode::OK, json!({ "charged": 20, "balance": 80 })));
    let (status, body) = svc.reserve("acme", 5, "req-1").await;
    assert_eq!((status, &body["reservation_id"]), (StatusCode::OK, &json!(held)));
}

async fn sigterm_exits_cleanly(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1).await;
    let status = svc.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

async fn sigterm_lets_in_flight_requests_finish(db: Db) {
    let mut svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    // Hold the account where the service needs it, so a reservation is still in flight at SIGTERM.
    let mut other = db.connect().await;
    if db.is_sqlite() {
        other.execute("BEGIN IMMEDIATE").await.unwrap();
    } else {
        other.execute("BEGIN").await.unwrap();
        other.execute("SELECT balance FROM accounts WHERE id = 'acme' FOR UPDATE").await.unwrap();
    }
    let body = json!({ "account": "acme", "amount": 10, "request_id": "req-1", "route": "/api" });
    let request = svc.http.post(format!("{}/v1/reservations", svc.base)).bearer_auth(SERVICE_TOKEN).json(&body);
    let in_flight = tokio::spawn(async move { request.send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_millis(300)).await;

    svc.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!svc.has_exited(), "exited with a request in flight");
    let fresh = reqwest::Client::new().get(format!("{}/v1/accounts/acme", svc.base)).send().await;
    assert!(fresh.is_err(), "a new connection was accepted after SIGTERM: {fresh:?}");

    other.execute("ROLLBACK").await.unwrap();
    assert_eq!(in_flight.await.unwrap(), StatusCode::CREATED);
    assert_eq!(svc.wait().code(), Some(0));
}

async fn database_trouble_is_503(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 100).await;
    let mut other = db.connect().await;
    if db.is_sqlite() {
        // Another process holds the write lock for longer than the busy timeout.
        other.execute("BEGIN IMMEDIATE").await.unwrap();
    } else {
        db.drop_under_service().await;
    }
    let (status, body) = svc.reserve("acme", 10, "req-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(!message.contains(&db.name()) && !message.contains("SQL") && !message.contains("database"), "{message}");
    if db.is_sqlite() {
        other.execute("ROLLBACK").await.unwrap();
        let (status, body) = svc.reserve("acme", 10, "req-1").await;
        assert_eq!(status, StatusCode::CREATED, "once the lock is gone: {body}");
    }
}

/// A gateway hangs up on a callout that outlives its timeout, at whatever point the service has
/// reached. Once, that could leave SQLite's one writer connection inside a transaction for good,
/// failing every later write. Each round hangs up on 32 reservations at staggered moments; the
/// ledger must keep answering, and a retry of each (as a gateway would send) must find it made
/// once or make it now: in the end, every request id holds exactly one credit.
async fn clients_that_hang_up_break_nothing(db: Db) {
    const ROUNDS: usize = 25;
    const PER_ROUND: usize = 32;
    const FUNDS: i64 = 1_000_000;
    let svc = Service::start(&db);
    svc.funded_account("acme", FUNDS).await;
    let address = svc.base.strip_prefix("http://").unwrap().to_owned();
    for round in 0..ROUNDS {
        let address = address.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                for i in 0..PER_ROUND {
                    let address = &address;
                    scope.spawn(move || hang_up(address, &format!("gone-{}", round * PER_ROUND + i), i));
                }
            });
        })
        .await
        .unwrap();
        let (status, body) = svc.reserve("acme", 1, &format!("stayed-{round}")).await;
        assert_eq!(status, StatusCode::CREATED, "after {} hang-ups: {body}", (round + 1) * PER_ROUND);
    }
    for id in 0..ROUNDS * PER_ROUND {
        let (status, body) = svc.reserve("acme", 1, &format!("gone-{id}")).await;
        assert!(matches!(status, StatusCode::OK | StatusCode::CREATED), "retry of gone-{id}: {status} {body}");
    }
    let holds = i64::try_from(ROUNDS * PER_ROUND + ROUNDS).unwrap();
    assert_eq!(svc.balance("acme").await, (FUNDS - holds, holds));
}

/// Sends a reservation and closes the connection without reading the answer, after a delay that
/// differs with `i` (0 to 3.1 ms), so that the hang-ups land at every stage of the work.
fn hang_up(address: &str, request_id: &str, i: usize) {
    use std::io::Write;
    let body = reserve_body("acme", 1, request_id, "/api");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let head = format!(
        "POST /v1/reservations HTTP/1.1\r\nhost: credit\r\nauthorization: Bearer {SERVICE_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(format!("{head}{body}").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_micros(100 * (i as u64)));
}

/// Sends every reservation at once; the answers in order.
async fn reserve_concurrently(svc: &Service, bodies: Vec<serde_json::Value>) -> Vec<(StatusCode, serde_json::Value)> {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let request = svc.http.post(format!("{}/v1/reservations", svc.base)).bearer_auth(SERVICE_TOKEN).json(&body);
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                (response.status(), response.json().await.unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// A short bearer token can be guessed: the service refuses to start with one.
#[test]
fn a_token_under_32_bytes_refuses_to_start() {
    for (service, admin, flag) in
        [("short-service-token", ADMIN_TOKEN, "--service-token"), (SERVICE_TOKEN, "short-admin-token", "--admin-token")]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-credit"))
            .args(["--listen", "127.0.0.1:0", "--database", "sqlite::memory:"])
            .env("TOLLGATE_CREDIT_SERVICE_TOKEN", service)
            .env("TOLLGATE_CREDIT_ADMIN_TOKEN", admin)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with a short {flag}");
        assert!(stderr.contains(&format!("{flag} must be at least 32 bytes")), "{stderr}");
    }
}
