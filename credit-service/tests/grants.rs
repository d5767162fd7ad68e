//! Grants end to end on both backends: what a gateway relies on when it spends credits locally and
//! reports them in batches — reports that can be retried, duplicated and reordered, fair grants
//! between gateways, a final grant near the end of a balance, expiry and closing, a ledger that
//! never goes negative under grants and per-request reservations at once, and the usage figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Db, Service, ADMIN_TOKEN, SERVICE_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Row};

on_both_backends!(
    reports_are_idempotent,
    two_instances_get_fair_shares_then_a_final_grant,
    a_final_grant_leaves_the_rest_to_exact_reservations,
    close_settles_and_ends_the_grant,
    unreported_grants_expire_at_their_last_report,
    grants_and_reservations_never_overdraw,
    usage_per_policy_for_both_modes,
    bad_reports_are_refused_one_by_one,
    a_ledger_from_before_grants_upgrades,
    sigkill_mid_reports_charges_each_credit_once,
);

/// A report, with the sizing knobs at `min_grant`..`max_grant`.
fn report(account: &str, grant: Option<&str>, used_total: i64, want_total: i64) -> Value {
    json!({
        "account": account, "grant_id": grant, "used_total": used_total, "usage": {},
        "want_total": want_total, "min_grant": 10, "max_grant": 100_000, "lifetime_seconds": 60, "close": false,
    })
}

fn with(mut report: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().unwrap() {
        report[k] = v.clone();
    }
    report
}

/// `POST /v1/grants` for `instance`; each report's (status, body).
async fn grants(svc: &Service, instance: &str, reports: Vec<Value>) -> Vec<(u16, Value)> {
    let (status, body) =
        svc.gateway(Method::POST, "/v1/grants", Some(json!({ "instance": instance, "reports": reports }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    results.iter().map(|r| (u16::try_from(r["status"].as_u64().unwrap()).unwrap(), r["body"].clone())).collect()
}

/// One report that must succeed; its body.
async fn grant(svc: &Service, instance: &str, report: Value) -> Value {
    let mut results = grants(svc, instance, vec![report]).await;
    let (status, body) = results.remove(0);
    assert_eq!(status, 200, "{body}");
    body
}

fn id(body: &Value) -> String {
    body["grant_id"].as_str().unwrap().to_owned()
}

/// Sums of the account: the journal adds up to the balance (checked by `journal`), and `held` is
/// every hold: held reservations and the unused rest of every live grant.
async fn check_holds(svc: &Service, db: &Db, account: &str) {
    svc.journal(account).await;
    let (balance, held) = svc.balance(account).await;
    assert!(balance >= 0 && held >= 0, "{balance} {held}");
    let mut conn = db.connect().await;
    let reserved: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM reservations WHERE account_id = $1 AND state = 'held'",
    )
    .bind(account)
    .fetch_one(&mut conn)
    .await
    .unwrap()
    .get(0);
    let granted: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(granted_total - used_total), 0) AS BIGINT) FROM grants \
         WHERE account_id = $1 AND status = 'live'",
    )
    .bind(account)
    .fetch_one(&mut conn)
    .await
    .unwrap()
    .get(0);
    assert_eq!(held, reserved + granted, "held is not the reservations ({reserved}) plus the grants ({granted})");
}

async fn reports_are_idempotent(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    // A fixed size (min = max), so the figures do not hang on the measured rate.
    let fixed = |grant: Option<&str>, used: i64, want: i64| {
        with(report("acme", grant, used, want), json!({ "min_grant": 100, "max_grant": 100 }))
    };
    let opened = grant(&svc, "gw-1", fixed(None, 0, 500)).await;
    assert_eq!(
        (&opened["granted_total"], &opened["used_total"], &opened["final"]),
        (&json!(100), &json!(0), &json!(false)),
        "{opened}"
    );
    assert_eq!(
        (&opened["balance"], &opened["available"], &opened["lifetime_seconds"]),
        (&json!(1000), &json!(900), &json!(60))
    );
    let gr = id(&opened);
    assert!(gr.starts_with("gr_"), "{gr}");
    // A retried open finds the same grant and holds nothing more, in another call or the same one.
    let results = grants(&svc, "gw-1", vec![fixed(None, 0, 500), fixed(None, 0, 500)]).await;
    for (status, body) in &results {
        assert_eq!((*status, body), (200, &opened));
    }
    assert_eq!(svc.balance("acme").await, (900, 100));

    // 60 credits spent on "api" and "search"; then the same report again, duplicated within a call,
    // and an older one arriving late: charged once.
    let used = with(
        fixed(Some(&gr), 60, 100),
        json!({ "usage": { "api": { "credits": 50, "requests": 5 }, "search": { "credits": 10, "requests": 1 } } }),
    );
    let older = with(fixed(Some(&gr), 20, 100), json!({ "usage": { "api": { "credits": 20, "requests": 2 } } }));
    let first = grant(&svc, "gw-1", used.clone()).await;
    assert_eq!((&first["used_total"], &first["balance"], &first["available"]), (&json!(60), &json!(940), &json!(900)));
    let results = grants(&svc, "gw-1", vec![used.clone(), older.clone(), used]).await;
    for (status, body) in results {
        assert_eq!((status, &body["used_total"], &body["balance"]), (200, &json!(60), &json!(940)), "{body}");
    }
    assert_eq!(svc.balance("acme").await, (900, 40));
    // A retried top-up (a target total, not a delta) holds once.
    for _ in 0..3 {
        let body = grant(&svc, "gw-1", fixed(Some(&gr), 60, 160)).await;
        assert_eq!((&body["granted_total"], &body["available"]), (&json!(160), &json!(840)), "{body}");
    }
    // A report past the grant is charged as the grant, never more.
    let body = grant(&svc, "gw-1", fixed(Some(&gr), 10_000, 0)).await;
    assert_eq!((&body["used_total"], &body["balance"]), (&json!(160), &json!(840)));

    let journal = svc.journal("acme").await;
    let kinds: Vec<(&str, i64)> = journal.iter().map(|(k, a, _)| (k.as_str(), *a)).collect();
    assert_eq!(kinds, [("topup", 1000), ("grant", -100), ("grant_use", 0), ("grant", -60), ("grant_use", 0)]);
    let rows = svc.transactions("acme").await;
    assert_eq!((&rows[2]["charged"], &rows[4]["charged"]), (&json!(60), &json!(100)));
    assert!(rows[1..].iter().all(|r| r["grant_id"] == json!(gr)), "{rows:?}");
    let usage = usage_figures(&svc, "acme", "").await;
    assert_eq!(usage, BTreeMap::from([("api".into(), (50, 5)), ("search".into(), (10, 1))]));
    check_holds(&svc, &db, "acme").await;
}

async fn two_instances_get_fair_shares_then_a_final_grant(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    let sized = |grant: Option<&str>, used: i64, min: i64| {
        with(report("acme", grant, used, 10_000), json!({ "min_grant": min, "max_grant": 300 }))
    };
    let a = grant(&svc, "gw-a", sized(None, 0, 300)).await;
    let b = grant(&svc, "gw-b", sized(None, 0, 300)).await;
    assert_ne!(id(&a), id(&b), "one grant per instance");
    assert_eq!((&a["granted_total"], &b["granted_total"], &b["available"]), (&json!(300), &json!(300), &json!(400)));
    // `a` spent its 300 and wants 300 more, but two grants share the 400 left: 200 at most.
    let a = grant(&svc, "gw-a", sized(Some(&id(&a)), 300, 100)).await;
    assert_eq!((&a["granted_total"], &a["available"], &a["final"]), (&json!(500), &json!(200), &json!(false)));
    // `b` spent its 300 too: its share (100) is below its minimum and its grant is used up: final.
    let b = grant(&svc, "gw-b", sized(Some(&id(&b)), 300, 300)).await;
    assert_eq!((&b["granted_total"], &b["available"], &b["final"]), (&json!(300), &json!(200), &json!(true)));
    assert_eq!(svc.balance("acme").await, (200, 200));
    check_holds(&svc, &db, "acme").await;
}

async fn a_final_grant_leaves_the_rest_to_exact_reservations(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 25).await;
    let opened = grant(&svc, "gw-1", report("acme", None, 0, 1000)).await;
    assert_eq!((&opened["granted_total"], &opened["final"]), (&json!(10), &json!(false)));
    // The gateway spent the 10 and asks for more; what is left (15) covers the minimum: it grows.
    let grown = grant(&svc, "gw-1", report("acme", Some(&id(&opened)), 10, 1000)).await;
    assert_eq!(grown["final"], false, "{grown}");
    let granted = grown["granted_total"].as_i64().unwrap();
    assert!(granted > 10 && granted <= 25, "{grown}");
    // It spends all of it: nothing left to add, nothing unused: final.
    let last = grant(&svc, "gw-1", report("acme", Some(&id(&opened)), granted, 1000)).await;
    assert_eq!((&last["final"], &last["granted_total"]), (&json!(true), &json!(granted)), "{last}");
    let left = 25 - granted;
    assert_eq!(last["available"], left);
    // The gateway closes the grant and bills per request: exact to the last credit.
    let closed =
        grant(&svc, "gw-1", with(report("acme", Some(&id(&opened)), granted, 0), json!({ "close": true }))).await;
    assert_eq!(closed["balance"], left);
    if left > 0 {
        let (status, body) = svc.reserve("acme", left + 1, "one-too-many").await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
        let held = svc.hold("acme", left, "the-last").await;
        assert_eq!(svc.commit(&held, None).await.0, StatusCode::OK);
    }
    assert_eq!(svc.balance("acme").await, (0, 0));
    // A top-up later: a new grant is not final.
    svc.top_up("acme", 500, "later").await;
    let again = grant(&svc, "gw-1", report("acme", None, 0, 100)).await;
    assert_ne!(id(&again), id(&opened));
    assert_eq!((&again["final"], &again["granted_total"]), (&json!(false), &json!(10)));
    check_holds(&svc, &db, "acme").await;
}

async fn close_settles_and_ends_the_grant(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    let fixed = |grant: Option<&str>, used: i64| {
        with(report("acme", grant, used, 200), json!({ "min_grant": 200, "max_grant": 200 }))
    };
    let opened = grant(&svc, "gw-1", fixed(None, 0)).await;
    let gr = id(&opened);
    let close = with(fixed(Some(&gr), 70), json!({ "close": true }));
    let closed = grant(&svc, "gw-1", close.clone()).await;
    assert_eq!(
        (&closed["used_total"], &closed["balance"], &closed["available"], &closed["final"]),
        (&json!(70), &json!(930), &json!(930), &json!(true)),
        "{closed}"
    );
    // Closing again: the same figures, nothing changes.
    assert_eq!(grant(&svc, "gw-1", close).await, closed);
    // Reporting on it, or topping it up, is 409 grant-ended.
    let results = grants(&svc, "gw-1", vec![fixed(Some(&gr), 80), report("acme", Some("gr_unknown"), 0, 10)]).await;
    for (status, body) in &results {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(body["type"], "urn:tollgate:problem:grant-ended", "{body}");
        assert_eq!(body["status"], 409);
        assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    }
    // Another instance cannot report on this instance's grant either.
    let (status, _) = grants(&svc, "gw-2", vec![fixed(Some(&gr), 80)]).await.remove(0);
    assert_eq!(status, 409);
    assert_eq!(svc.balance("acme").await, (930, 0));
    assert_eq!(
        svc.journal("acme").await,
        [
            ("topup".into(), 1000, 1000),
            ("grant".into(), -200, 800),
            ("grant_use".into(), 0, 800),
            ("grant_close".into(), 130, 930)
        ]
    );
    // A fresh open after the close is a new grant.
    let fresh = grant(&svc, "gw-1", fixed(None, 0)).await;
    assert_ne!(id(&fresh), gr);
    check_holds(&svc, &db, "acme").await;
}

async fn unreported_grants_expire_at_their_last_report(db: Db) {
    let svc = Service::start_with(&db, &["--sweep-interval-seconds", "1"]);
    svc.funded_account("acme", 1000).await;
    svc.funded_account("busy", 1000).await;
    let fixed = |account: &str, grant: Option<&str>, used: i64| {
        with(report(account, grant, used, 100), json!({ "min_grant": 100, "max_grant": 100, "lifetime_seconds": 1 }))
    };
    let idle = grant(&svc, "gw-1", fixed("acme", None, 0)).await;
    let busy = grant(&svc, "gw-1", fixed("busy", None, 0)).await;
    grant(&svc, "gw-1", fixed("acme", Some(&id(&idle)), 30)).await;
    // `busy` keeps reporting every 300 ms; `acme` goes quiet and is settled at its 30.
    let started = Instant::now();
    while svc.balance("acme").await != (970, 0) {
        assert!(started.elapsed() < Duration::from_secs(10), "not expired within 10 s; log:\n{}", svc.log());
        grant(&svc, "gw-1", fixed("busy", Some(&id(&busy)), 5)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "expired before twice its lifetime");
    let still = grant(&svc, "gw-1", fixed("busy", Some(&id(&busy)), 5)).await;
    assert_eq!(still["grant_id"], busy["grant_id"], "a grant reported on stays live");
    let (status, body) = grants(&svc, "gw-1", vec![fixed("acme", Some(&id(&idle)), 40)]).await.remove(0);
    assert_eq!((status, &body["type"]), (409, &json!("urn:tollgate:problem:grant-ended")), "{body}");
    let journal = svc.journal("acme").await;
    assert_eq!(journal.last().unwrap(), &("grant_expire".to_owned(), 70, 970));
    check_holds(&svc, &db, "acme").await;
}

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Gateways spending grants and others reserving per request, on two service instances sharing
/// the database, against one small balance: nobody is ever answered more than there was.
async fn grants_and_reservations_never_overdraw(db: Db) {
    const FUNDS: i64 = 2_000;
    let svc = Service::start(&db);
    let twin = Service::start(&db);
    svc.funded_account("acme", FUNDS).await;
    let services = [Arc::new(svc), Arc::new(twin)];
    let gateways: Vec<_> = (0..4u64)
        .map(|g| {
            let svc = Arc::clone(&services[usize::try_from(g % 2).unwrap()]);
            tokio::spawn(async move {
                let instance = format!("gw-{g}");
                let mut rng = Lcg(g + 1);
                let (mut grant_id, mut granted, mut used) = (None::<String>, 0, 0);
                for _ in 0..40 {
                    // Spend part of what is granted, as the gateway does between reports.
                    used += i64::try_from(rng.below(u64::try_from(granted - used).unwrap() + 1)).unwrap();
                    let want = used + 50;
                    let close = rng.below(8) == 0;
                    let body = with(
                        report("acme", grant_id.as_deref(), used, want),
                        json!({ "min_grant": 5, "max_grant": 80, "close": close }),
                    );
                    let (status, body) = grants(&svc, &instance, vec![body]).await.remove(0);
                    match status {
                        200 => {
                            assert!(body["available"].as_i64().unwrap() >= 0, "{body}");
                            if close {
                                (grant_id, granted, used) = (None, 0, 0);
                            } else {
                                grant_id = Some(id(&body));
                                granted = body["granted_total"].as_i64().unwrap();
                            }
                        }
                        409 => (grant_id, granted, used) = (None, 0, 0),
                        other => panic!("{other}: {body}"),
                    }
                }
                if let Some(gr) = grant_id {
                    let close = with(report("acme", Some(&gr), used, 0), json!({ "close": true }));
                    assert_eq!(grants(&svc, &instance, vec![close]).await[0].0, 200);
                }
            })
        })
        .collect();
    let per_request: Vec<_> = (0..4u64)
        .map(|c| {
            let svc = Arc::clone(&services[usize::try_from(c % 2).unwrap()]);
            tokio::spawn(async move {
                let mut rng = Lcg(100 + c);
                let (mut charged, mut refused) = (0, 0);
                for i in 0..40 {
                    let amount = i64::try_from(rng.below(30)).unwrap() + 1;
                    let (status, body) = svc.reserve("acme", amount, &format!("r{c}-{i}")).await;
                    match status {
                        StatusCode::CREATED => {
                            let reservation = body["reservation_id"].as_str().unwrap();
                            let (status, body) = svc.commit(reservation, None).await;
                            assert_eq!(status, StatusCode::OK, "{body}");
                            charged += amount;
                        }
                        StatusCode::PAYMENT_REQUIRED => refused += 1,
                        other => panic!("{other}: {body}"),
                    }
                }
                (charged, refused)
            })
        })
        .collect();
    for gateway in gateways {
        gateway.await.unwrap();
    }
    let (mut by_request, mut refused) = (0, 0);
    for client in per_request {
        let (charged, short) = client.await.unwrap();
        by_request += charged;
        refused += short;
    }
    let (balance, held) = services[0].balance("acme").await;
    assert_eq!(held, 0, "every grant closed, every reservation committed");
    assert!(balance >= 0);
    // What the grants charged, from their rows: with the reservations, exactly what left the balance.
    let by_grants: i64 = services[0].transactions("acme").await.iter().filter_map(|r| r["charged"].as_i64()).sum();
    assert_eq!(by_grants + by_request, FUNDS - balance);
    assert!(by_grants > 0 && by_request > 0, "both modes spent: {by_grants} {by_request}");
    assert!(refused > 0, "the balance never ran short: the soak did not reach the edge it is for");
    check_holds(&services[0], &db, "acme").await;
}

/// `GET /v1/accounts/{id}/usage` with `query`, as policy → (credits, requests) summed over buckets.
async fn usage_figures(svc: &Service, account: &str, query: &str) -> BTreeMap<String, (i64, i64)> {
    let (status, body) = svc.gateway(Method::GET, &format!("/v1/accounts/{account}/usage{query}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut sums = BTreeMap::new();
    for row in body["usage"].as_array().unwrap() {
        let entry = sums.entry(row["policy"].as_str().unwrap().to_owned()).or_insert((0, 0));
        entry.0 += row["credits"].as_i64().unwrap();
        entry.1 += row["requests"].as_i64().unwrap();
    }
    sums
}

async fn usage_per_policy_for_both_modes(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    svc.funded_account("quiet", 1000).await;
    // Per request: committed reservations count under their route; a released one does not.
    for (i, charge) in [(0, Some(3)), (1, None)] {
        let held = svc.hold("acme", 5, &format!("q{i}")).await;
        assert_eq!(svc.commit(&held, charge).await.0, StatusCode::OK);
    }
    let released = svc.hold("acme", 5, "q-released").await;
    assert_eq!(svc.release(&released).await.0, StatusCode::OK);
    // Grants: two instances report on "api" and "search".
    for instance in ["gw-1", "gw-2"] {
        let opened = grant(&svc, instance, with(report("acme", None, 0, 100), json!({ "min_grant": 100 }))).await;
        let used = json!({ "api": { "credits": 40, "requests": 4 }, "search": { "credits": 2, "requests": 2 } });
        grant(&svc, instance, with(report("acme", Some(&id(&opened)), 42, 100), json!({ "usage": used }))).await;
    }

    let (status, body) = svc.gateway(Method::GET, "/v1/accounts/acme/usage", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["account"], &body["granularity"]), (&json!("acme"), &json!("hour")));
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap();
    let hour = now - now % 3_600_000;
    for row in body["usage"].as_array().unwrap() {
        let start = row["start"].as_i64().unwrap();
        assert!(start % 3_600_000 == 0 && (hour - 3_600_000..=hour).contains(&start), "{row}");
    }
    let want = BTreeMap::from([("/api/things".into(), (8, 2)), ("api".into(), (80, 8)), ("search".into(), (4, 4))]);
    assert_eq!(usage_figures(&svc, "acme", "").await, want);
    // By day, with the admin token too, over a range holding today.
    let day = format!("?granularity=day&from={}&to={}", now - 86_400_000, now + 1);
    let (status, body) = svc.admin(Method::GET, &format!("/v1/accounts/acme/usage{day}"), None).await;
    assert_eq!((status, &body["granularity"]), (StatusCode::OK, &json!("day")), "{body}");
    for row in body["usage"].as_array().unwrap() {
        assert_eq!(row["start"].as_i64().unwrap() % 86_400_000, 0, "{row}");
    }
    assert_eq!(usage_figures(&svc, "acme", &day).await, want);
    // A range before any of it, and an account with none.
    let past = format!("?from={}&to={}", now - 30 * 86_400_000, now - 29 * 86_400_000);
    assert!(usage_figures(&svc, "acme", &past).await.is_empty());
    assert!(usage_figures(&svc, "quiet", "").await.is_empty());

    for (query, want_status, code) in [
        ("?granularity=minute", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?extra=1", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?from=10&to=5", StatusCode::BAD_REQUEST, "invalid_field"),
        ("?from=0&to=4000000000000", StatusCode::BAD_REQUEST, "invalid_field"),
        ("?from=-5", StatusCode::BAD_REQUEST, "invalid_field"),
    ] {
        let (status, body) = svc.gateway(Method::GET, &format!("/v1/accounts/acme/usage{query}"), None).await;
        assert_eq!((status, body["error"].as_str().unwrap()), (want_status, code), "{query}: {body}");
    }
    let (status, body) = svc.gateway(Method::GET, "/v1/accounts/nobody/usage", None).await;
    assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("account_not_found")));
    let (status, _) = svc.call(Method::GET, "/v1/accounts/acme/usage", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn bad_reports_are_refused_one_by_one(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    let results = grants(
        &svc,
        "gw-1",
        vec![
            report("nobody", None, 0, 10),
            with(report("acme", None, 0, 10), json!({ "lifetime_seconds": 0 })),
            with(report("acme", None, 0, 10), json!({ "lifetime_seconds": 3601 })),
            with(report("acme", None, 0, 10), json!({ "min_grant": 50, "max_grant": 10 })),
            with(report("acme", None, -1, 10), json!({})),
            with(report("acme", None, 0, 10), json!({ "usage": { "": { "credits": 1, "requests": 1 } } })),
            report("ac me", None, 0, 10),
            report("acme", None, 0, 10),
        ],
    )
    .await;
    let (status, body) = &results[0];
    assert_eq!(*status, 404, "{body}");
    assert_eq!(body["type"], "urn:tollgate:problem:account-not-found");
    assert_eq!((&body["status"], body["detail"].as_str().unwrap().contains("nobody")), (&json!(404), true));
    for (status, body) in &results[1..7] {
        assert_eq!((*status, &body["type"]), (400, &json!("urn:tollgate:problem:invalid-field")), "{body}");
    }
    assert_eq!(results[7].0, 200, "a good report beside bad ones: {}", results[7].1);
    // Without `lifetime_seconds`, a grant lives 60 s.
    let mut plain = report("acme", None, 0, 10);
    plain.as_object_mut().unwrap().remove("lifetime_seconds");
    assert_eq!(grant(&svc, "gw-2", plain).await["lifetime_seconds"], 60);

    let too_many: Vec<Value> = (0..1001).map(|_| report("acme", None, 0, 10)).collect();
    let envelope = [
        (Some(SERVICE_TOKEN), json!({ "instance": "gw-1", "reports": [] }), StatusCode::BAD_REQUEST, "invalid_field"),
        (
            Some(SERVICE_TOKEN),
            json!({ "instance": "gw-1", "reports": too_many }),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Some(SERVICE_TOKEN),
            json!({ "instance": "", "reports": [report("acme", None, 0, 10)] }),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            Some(SERVICE_TOKEN),
            json!({ "instance": "gw-1", "reports": [with(report("acme", None, 0, 10), json!({ "extra": 1 }))] }),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Some(SERVICE_TOKEN),
            json!({ "reports": [report("acme", None, 0, 10)] }),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Some(ADMIN_TOKEN),
            json!({ "instance": "gw-1", "reports": [report("acme", None, 0, 10)] }),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
    ];
    for (token, body, want_status, code) in envelope {
        let (status, json) = svc.call(Method::POST, "/v1/grants", token, Some(&body.to_string())).await;
        assert_eq!((status, json["error"].as_str().unwrap()), (want_status, code), "{json}");
    }
    // A full call of 1000 reports fits: one per account of a busy gateway.
    for i in 0..1000 {
        svc.funded_account(&format!("a{i}"), 10).await;
    }
    let full: Vec<Value> = (0..1000).map(|i| report(&format!("a{i}"), None, 0, 10)).collect();
    let results = grants(&svc, "gw-3", full).await;
    assert!(results.iter().all(|(status, body)| *status == 200 && body["granted_total"] == 10));
    assert_eq!(svc.balance("a999").await, (0, 10));
}

/// The schema as migrations 1 and 2 left it, before grants: what a running deployment has.
const SCHEMA_BEFORE_GRANTS: &str = "
CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL);
INSERT INTO schema_migrations VALUES (1, 'accounts, reservations, journal', 0), (2, 'no foreign-key triggers on PostgreSQL', 0);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY, balance BIGINT NOT NULL CHECK (balance >= 0), held BIGINT NOT NULL CHECK (held >= 0),
    created_at BIGINT NOT NULL);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts (id), request_id TEXT NOT NULL,
    route TEXT NOT NULL, amount BIGINT NOT NULL CHECK (amount > 0),
    state TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')), charged BIGINT,
    created_at BIGINT NOT NULL, settled_at BIGINT, UNIQUE (account_id, request_id));
CREATE INDEX reservations_held_by_age ON reservations (created_at) WHERE state = 'held';
CREATE TABLE ledger (
    id {ID}, account_id TEXT NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL CHECK (kind IN ('topup', 'reserve', 'commit', 'release', 'expire')),
    amount BIGINT NOT NULL, balance_after BIGINT NOT NULL, reservation_id TEXT REFERENCES reservations (id),
    reference TEXT, created_at BIGINT NOT NULL);
CREATE UNIQUE INDEX ledger_topup_reference ON ledger (account_id, reference) WHERE kind = 'topup';
CREATE INDEX ledger_by_account ON ledger (account_id, id);
INSERT INTO accounts VALUES ('acme', 70, 30, 0);
INSERT INTO reservations VALUES ('res_0123456789abcdef0123456789abcdef', 'acme', 'q1', '/api', 30, 'held', NULL, {NOW}, NULL);
";

/// A ledger written before grants existed keeps its journal (ids and all), its open reservation and
/// its top-up references, and takes grants after the upgrade.
async fn a_ledger_from_before_grants_upgrades(db: Db) {
    let id = if db.is_sqlite() {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    } else {
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    };
    // The service's own URL, but creating the SQLite file, as the service would.
    let url = if db.is_sqlite() { format!("{}?mode=rwc", db.url()) } else { db.url() };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis().to_string();
    sqlx::raw_sql(&SCHEMA_BEFORE_GRANTS.replace("{ID}", id).replace("{NOW}", &now)).execute(&mut conn).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO ledger (id, account_id, kind, amount, balance_after, reservation_id, reference, created_at) VALUES \
         (5, 'acme', 'topup', 100, 100, NULL, 'invoice-1', 0), \
         (9, 'acme', 'reserve', -30, 70, 'res_0123456789abcdef0123456789abcdef', NULL, 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    if !db.is_sqlite() {
        // As migration 2 left PostgreSQL: the identity carries on after the highest id.
        sqlx::raw_sql("SELECT setval(pg_get_serial_sequence('ledger', 'id'), 9)").execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let svc = Service::start(&db);
    assert_eq!(svc.balance("acme").await, (70, 30));
    let (status, body) = svc.top_up("acme", 100, "invoice-1").await;
    assert_eq!((status, &body["transaction_id"]), (StatusCode::OK, &json!(5)), "the reference is remembered: {body}");
    let (status, body) = svc.commit("res_0123456789abcdef0123456789abcdef", Some(20)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "charged": 20, "balance": 80 })));
    let opened = grant(&svc, "gw-1", report("acme", None, 0, 100)).await;
    assert_eq!(opened["granted_total"], 10);
    let ids: Vec<i64> = svc.transactions("acme").await.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(&ids[..2], [5, 9]);
    assert!(ids[2] > 9 && ids[3] > ids[2], "{ids:?}");
    assert_eq!(
        svc.journal("acme").await,
        [("topup".into(), 100, 100), ("reserve".into(), -30, 70), ("commit".into(), 10, 80), ("grant".into(), -10, 70)]
    );
    check_holds(&svc, &db, "acme").await;
    if db.is_sqlite() {
        check_membership_checks(&db).await;
    }
}

/// The values each membership `CHECK` admits on SQLite, by table and column.
const MEMBERSHIP_CHECKS: [(&str, &str, &[&str]); 3] = [
    ("reservations", "state", &["held", "committed", "released", "expired"]),
    (
        "ledger",
        "kind",
        &["topup", "reserve", "commit", "release", "expire", "grant", "grant_use", "grant_close", "grant_expire"],
    ),
    ("grants", "status", &["live", "closed", "expired"]),
];

/// SQLite after migration 5: each table's membership `CHECK` is written as comparisons, so writing
/// a row builds no temporary b-tree of the list (what made it slow); it still admits exactly its
/// values, and the database is sound. Needs a row in each table; leaves them as they were.
async fn check_membership_checks(db: &Db) {
    let mut conn = db.connect().await;
    let tables: Vec<(String, String)> =
        sqlx::query_as("SELECT name, sql FROM sqlite_schema WHERE type = 'table'").fetch_all(&mut conn).await.unwrap();
    assert!(tables.iter().all(|(_, sql)| !sql.contains(" IN (")), "{tables:#?}");
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
    for (table, column, values) in MEMBERSHIP_CHECKS {
        let set = format!("UPDATE {table} SET {column} = ?1 WHERE rowid = (SELECT MIN(rowid) FROM {table})");
        let opcodes = sqlx::query(&format!("EXPLAIN {set}")).bind("x").fetch_all(&mut conn).await.unwrap();
        let opcodes: Vec<String> = opcodes.iter().map(|row| row.get::<String, _>(1)).collect();
        assert!(!opcodes.contains(&"OpenEphemeral".to_owned()), "{table}: {opcodes:?}");
        for value in values {
            let done = sqlx::query(&set).bind(value).execute(&mut conn).await.unwrap();
            assert_eq!(done.rows_affected(), 1, "{table}.{column} = {value}");
        }
        for value in ["bogus", "", "HELD", "topup "] {
            let refused = sqlx::query(&set).bind(value).execute(&mut conn).await.unwrap_err();
            assert!(refused.to_string().contains("CHECK constraint failed"), "{table}.{column} = {value}: {refused}");
        }
    }
    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut conn).await.unwrap();
    assert_eq!(integrity, "ok");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn sqlite_membership_checks_are_comparisons() {
    let db = Db::sqlite().await;
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    svc.hold("acme", 10, "q1").await;
    grant(&svc, "gw-1", report("acme", None, 0, 100)).await;
    assert_eq!(svc.terminate().code(), Some(0));
    check_membership_checks(&db).await;
}

/// The key columns migration 4 gives bytewise ("C") collation on PostgreSQL.
const BYTEWISE_KEYS: [(&str, &str); 16] = [
    ("accounts", "id"),
    ("reservations", "id"),
    ("reservations", "account_id"),
    ("reservations", "request_id"),
    ("reservations", "route"),
    ("ledger", "account_id"),
    ("ledger", "reservation_id"),
    ("ledger", "reference"),
    ("ledger", "grant_id"),
    ("grants", "id"),
    ("grants", "account_id"),
    ("grants", "instance"),
    ("grant_usage", "grant_id"),
    ("grant_usage", "policy"),
    ("usage", "account_id"),
    ("usage", "policy"),
];

/// The collation of each of `BYTEWISE_KEYS`, in order (None: the database's default).
async fn key_collations(conn: &mut sqlx::PgConnection) -> Vec<Option<String>> {
    let mut found = Vec::new();
    for (table, column) in BYTEWISE_KEYS {
        let collation: Option<String> = sqlx::query_scalar(
            "SELECT collation_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        found.push(collation);
    }
    found
}

/// A PostgreSQL ledger written with migrations 1 to 3 (keys in the database's collation) is
/// upgraded in place: its indexes rebuilt bytewise, every answer the same afterwards — balances,
/// a remembered top-up reference, a replayed request id, an open reservation, a live grant and
/// its usage.
#[tokio::test]
async fn a_ledger_with_collated_keys_upgrades_to_bytewise_keys() {
    let db = Db::postgres().await;
    let svc = Service::start(&db);
    svc.funded_account("acme", 1000).await;
    let committed = svc.hold("acme", 10, "q-committed").await;
    assert_eq!(svc.commit(&committed, Some(7)).await.0, StatusCode::OK);
    let held = svc.hold("acme", 20, "q-held").await;
    let used = json!({ "api": { "credits": 5, "requests": 5 } });
    let opened = grant(&svc, "gw-1", with(report("acme", None, 0, 100), json!({ "min_grant": 100 }))).await;
    let opened = grant(&svc, "gw-1", with(report("acme", Some(&id(&opened)), 5, 100), json!({ "usage": used }))).await;
    let before = (svc.balance("acme").await, svc.transactions("acme").await, usage_figures(&svc, "acme", "").await);
    assert_eq!(svc.terminate().code(), Some(0));

    // Back to what migration 3 left: every key in the database's default collation.
    let mut conn = sqlx::PgConnection::connect(&db.url()).await.unwrap();
    for (table, column) in BYTEWISE_KEYS {
        sqlx::raw_sql(&format!("ALTER TABLE {table} ALTER COLUMN {column} TYPE TEXT COLLATE \"default\""))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::raw_sql("DELETE FROM schema_migrations WHERE version = 4").execute(&mut conn).await.unwrap();
    assert!(key_collations(&mut conn).await.iter().all(Option::is_none));

    let svc = Service::start(&db);
    assert!(svc.log().contains("applied migration 4"), "{}", svc.log());
    assert!(key_collations(&mut conn).await.iter().all(|c| c.as_deref() == Some("C")));
    assert_eq!(
        before,
        (svc.balance("acme").await, svc.transactions("acme").await, usage_figures(&svc, "acme", "").await)
    );
    let (status, body) = svc.top_up("acme", 1000, "initial-acme").await;
    assert_eq!(status, StatusCode::OK, "the reference is remembered: {body}");
    let (status, body) = svc.reserve("acme", 10, "q-committed").await;
    assert_eq!((status, &body["reservation_id"]), (StatusCode::OK, &json!(committed)), "{body}");
    assert_eq!(svc.commit(&held, Some(15)).await.0, StatusCode::OK);
    let reported = grant(&svc, "gw-1", with(report("acme", Some(&id(&opened)), 9, 100), json!({ "usage": {} }))).await;
    assert_eq!(id(&reported), id(&opened));
    assert_eq!(svc.balance("acme").await.0, 1000 - 7 - 15 - reported["granted_total"].as_i64().unwrap());
    check_holds(&svc, &db, "acme").await;
    conn.close().await.unwrap();
}

/// One gateway's view of its grants, one per account: `(grant_id, granted_total, used_total)`.
type GatewayGrants = Vec<(Option<String>, i64, i64)>;

/// Reports for every account, spending 3 more of each grant per round, until the service stops
/// answering; returns what the gateway knows, with the use it last sent.
async fn report_until_killed(base: String, instance: String, accounts: usize) -> GatewayGrants {
    let http = reqwest::Client::new();
    let mut grants: GatewayGrants = vec![(None, 0, 0); accounts];
    loop {
        let reports: Vec<Value> = grants
            .iter_mut()
            .enumerate()
            .map(|(i, (grant, granted, used))| {
                *used = (*used + 3).min(*granted);
                report(&format!("k{i}"), grant.as_deref(), *used, *used + 30)
            })
            .collect();
        let sent = http
            .post(format!("{base}/v1/grants"))
            .bearer_auth(SERVICE_TOKEN)
            .json(&json!({ "instance": instance, "reports": reports }))
            .send()
            .await;
        let Ok(response) = sent else { return grants };
        let Ok(answer) = response.json::<Value>().await else { return grants };
        for (result, (grant, granted, _)) in answer["results"].as_array().unwrap().iter().zip(&mut grants) {
            assert_eq!(result["status"], 200, "{result}");
            *grant = Some(id(&result["body"]));
            *granted = result["body"]["granted_total"].as_i64().unwrap();
        }
    }
}

/// The service is killed mid-load and restarted; the gateways then send their last reports again,
/// closing their grants. Whatever the kill interrupted, each account is charged exactly the use the
/// gateways reported, once: nothing lost, nothing twice.
async fn sigkill_mid_reports_charges_each_credit_once(db: Db) {
    const ACCOUNTS: usize = 20;
    const FUNDS: i64 = 1_000_000;
    let svc = Service::start(&db);
    for i in 0..ACCOUNTS {
        svc.funded_account(&format!("k{i}"), FUNDS).await;
    }
    let gateways: Vec<_> =
        (0..3).map(|g| tokio::spawn(report_until_killed(svc.base.clone(), format!("gw-{g}"), ACCOUNTS))).collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    svc.signal("KILL");
    let mut last = Vec::new();
    for gateway in gateways {
        last.push(gateway.await.unwrap());
    }
    drop(svc);
    let svc = Service::start(&db);
    let mut reported = [0; ACCOUNTS];
    for (g, known) in last.iter().enumerate() {
        let closes: Vec<Value> = known
            .iter()
            .enumerate()
            .map(|(i, (grant, _, used))| {
                reported[i] += used;
                with(report(&format!("k{i}"), grant.as_deref(), *used, 0), json!({ "close": true }))
            })
            .collect();
        for (status, body) in grants(&svc, &format!("gw-{g}"), closes).await {
            // A grant the gateway never heard of was opened (its answer lost) at 0 used; one it
            // knows is still live (lifetime 60 s): both close at what was reported.
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!(reported.iter().sum::<i64>() > 0, "nothing was spent before the kill");
    for (i, used) in reported.iter().enumerate() {
        let account = format!("k{i}");
        let charged: i64 = svc.transactions(&account).await.iter().filter_map(|r| r["charged"].as_i64()).sum();
        assert_eq!(charged, *used, "{account}");
        assert_eq!(svc.balance(&account).await, (FUNDS - used, 0), "{account}");
        check_holds(&svc, &db, &account).await;
    }
}
