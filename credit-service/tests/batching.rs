//! Group commit and the batch endpoint, end to end on both backends: each operation of a batch gets
//! its own answer, a SIGKILL mid-batch loses nothing acknowledged and leaves nothing half done, and the
//! ledger adds up after a concurrent soak on two instances sharing one database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Db, Service, ADMIN_TOKEN, SERVICE_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;

on_both_backends!(
    a_batch_answers_each_operation_on_its_own,
    batch_envelope_errors,
    sigkill_mid_batch_loses_nothing_acknowledged,
    the_ledger_adds_up_after_a_concurrent_soak,
);

async fn batch(svc: &Service, operations: Vec<Value>) -> Vec<(u16, Value)> {
    let (status, body) = svc.gateway(Method::POST, "/v1/batch", Some(json!({ "operations": operations }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (u16::try_from(r["status"].as_u64().unwrap()).unwrap(), r["body"].clone()))
        .collect()
}

fn reserve(account: &str, amount: i64, request_id: &str) -> Value {
    json!({ "op": "reserve", "account": account, "amount": amount, "request_id": request_id, "route": "/api" })
}

async fn a_batch_answers_each_operation_on_its_own(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 10).await;
    let released = svc.hold("acme", 4, "r1").await;
    assert_eq!(svc.release(&released).await.0, StatusCode::OK);
    let unknown = "res_00000000000000000000000000000000";

    let results = batch(
        &svc,
        vec![
            reserve("acme", 100, "big"),
            json!({ "op": "commit", "reservation_id": released }),
            reserve("acme", 3, "good"),
            json!({ "op": "commit", "reservation_id": unknown, "amount": 1 }),
            reserve("acme", 0, "zero"),
            json!({ "op": "release", "reservation_id": released }),
            reserve("acme", 3, "good"),
            reserve("nobody", 1, "x"),
        ],
    )
    .await;
    assert_eq!(results.len(), 8);
    let (status, body) = &results[0];
    assert_eq!(*status, 402, "{body}");
    assert_eq!(
        (&body["error"], &body["balance"], &body["required"]),
        (&json!("insufficient_credits"), &json!(10), &json!(100))
    );
    assert_eq!(results[1].0, 409, "{}", results[1].1);
    assert_eq!(results[1].1["error"], "reservation_released");
    let (status, good) = &results[2];
    assert_eq!(*status, 201, "{good}");
    assert_eq!(good["balance"], 7);
    let good_id = good["reservation_id"].as_str().unwrap();
    assert_eq!((results[3].0, &results[3].1["error"]), (404, &json!("reservation_not_found")));
    assert_eq!((results[4].0, &results[4].1["error"]), (400, &json!("invalid_field")));
    assert_eq!(results[5], (200, json!({ "released": 4, "balance": 7 })));
    assert_eq!(results[6], (200, json!({ "reservation_id": good_id, "balance": 7 })), "a replay within the batch");
    assert_eq!((results[7].0, &results[7].1["error"]), (404, &json!("account_not_found")));

    // Each refusal is exactly what the single call answers.
    let (status, single) = svc.commit(&released, None).await;
    assert_eq!((status.as_u16(), &single), (results[1].0, &results[1].1));
    let (status, single) = svc.commit(unknown, Some(1)).await;
    assert_eq!((status.as_u16(), &single), (results[3].0, &results[3].1));
    let (status, single) = svc.reserve("acme", 0, "zero").await;
    assert_eq!((status.as_u16(), &single), (results[4].0, &results[4].1));
    let (status, single) = svc.reserve("acme", 100, "big").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let fields = |b: &Value| [b["error"].clone(), b["required"].clone()];
    assert_eq!(fields(&single), fields(body), "{single}");
    assert_eq!(single["balance"], 7, "the balance now, after the good reservation");

    // Only the good reservation was made.
    assert_eq!(svc.balance("acme").await, (7, 3));
    assert_eq!(
        svc.journal("acme").await,
        [("topup".into(), 10, 10), ("reserve".into(), -4, 6), ("release".into(), 4, 10), ("reserve".into(), -3, 7)]
    );

    // Commit and release through the batch, and their replays.
    let results = batch(
        &svc,
        vec![
            json!({ "op": "commit", "reservation_id": good_id, "amount": 4 }),
            json!({ "op": "commit", "reservation_id": good_id, "amount": 2 }),
            json!({ "op": "commit", "reservation_id": good_id }),
            json!({ "op": "release", "reservation_id": good_id }),
        ],
    )
    .await;
    assert_eq!((results[0].0, &results[0].1["error"]), (422, &json!("amount_exceeds_reservation")));
    assert_eq!((&results[0].1["amount"], &results[0].1["reserved"]), (&json!(4), &json!(3)));
    assert_eq!(results[1], (200, json!({ "charged": 2, "balance": 8 })));
    assert_eq!(results[2], (200, json!({ "charged": 2, "balance": 8 })));
    assert_eq!((results[3].0, &results[3].1["error"]), (409, &json!("reservation_committed")));
    assert_eq!(svc.commit(good_id, None).await, (StatusCode::OK, json!({ "charged": 2, "balance": 8 })));
    assert_eq!(svc.balance("acme").await, (8, 0));
}

async fn batch_envelope_errors(db: Db) {
    let svc = Service::start(&db);
    svc.funded_account("acme", 10_000).await;
    let too_many: Vec<Value> = (0..1001).map(|i| reserve("acme", 1, &format!("r{i}"))).collect();
    let cases = [
        (Some(SERVICE_TOKEN), json!({ "operations": [] }).to_string(), StatusCode::BAD_REQUEST, "invalid_field"),
        (Some(SERVICE_TOKEN), json!({ "operations": too_many }).to_string(), StatusCode::BAD_REQUEST, "invalid_field"),
        (
            Some(SERVICE_TOKEN),
            json!({ "operations": [{ "op": "top_up" }] }).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Some(SERVICE_TOKEN),
            json!({ "operations": [{ "op": "release", "reservation_id": "r", "x": 1 }] }).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (Some(SERVICE_TOKEN), "{}".to_owned(), StatusCode::BAD_REQUEST, "invalid_json"),
        (
            Some(ADMIN_TOKEN),
            json!({ "operations": [reserve("acme", 1, "a")] }).to_string(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            None,
            json!({ "operations": [reserve("acme", 1, "a")] }).to_string(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some(SERVICE_TOKEN),
            format!(r#"{{"operations":[],"pad":"{}"}}"#, "x".repeat(1024 * 1024)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (token, body, want_status, want_code) in cases {
        let (status, json) = svc.call(Method::POST, "/v1/batch", token, Some(&body)).await;
        assert_eq!(
            (status, json["error"].as_str().unwrap()),
            (want_status, want_code),
            "{}: {json}",
            &body[..body.len().min(80)]
        );
    }
    // Every operation refused before the ledger: each still gets its answer.
    let results = batch(&svc, vec![reserve("acme", 0, "z"), json!({ "op": "release", "reservation_id": "x-y" })]).await;
    assert_eq!((results[0].0, &results[0].1["error"]), (400, &json!("invalid_field")));
    assert_eq!((results[1].0, &results[1].1["error"]), (404, &json!("reservation_not_found")));
    // A full batch of 1000 fits, far past the single calls' 16 KiB.
    let full: Vec<Value> = (0..1000).map(|i| reserve("acme", 1, &format!("{i:0>200}"))).collect();
    let results = batch(&svc, full).await;
    assert!(results.iter().all(|(status, _)| *status == 201));
    assert_eq!(svc.balance("acme").await, (9_000, 1_000));
}

/// Every state the tables can be in after any crash must add up: per account, the journal sums to the
/// balance row by row and never goes negative, `held` is the sum of held reservations, and each
/// reservation has its `reserve` row and exactly the settlement row its state says.
async fn check_ledger(db: &Db) -> BTreeMap<String, (String, i64, Option<i64>)> {
    let mut conn = db.connect().await;
    // One snapshot for all three tables: a killed service's PostgreSQL backend may still commit
    // the transaction whose COMMIT it had received, between two reads.
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    if !db.is_sqlite() {
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut conn).await.unwrap();
    }
    let accounts: Vec<(String, i64, i64)> = sqlx::query("SELECT id, balance, held FROM accounts ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let reservations: BTreeMap<String, (String, i64, String, Option<i64>)> =
        sqlx::query("SELECT id, account_id, amount, state, charged FROM reservations")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
            .collect();
    let journal: Vec<(String, String, i64, i64, Option<String>)> =
        sqlx::query("SELECT account_id, kind, amount, balance_after, reservation_id FROM ledger ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
    let mut running: BTreeMap<&str, i64> = BTreeMap::new();
    let mut rows_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (account, kind, amount, after, reservation) in &journal {
        let balance = running.entry(account).or_default();
        *balance += amount;
        assert_eq!(*balance, *after, "journal of {account} does not add up at a {kind} row");
        assert!(*balance >= 0, "{account} went negative");
        if let Some(id) = reservation {
            rows_of.entry(id).or_default().push(kind);
        }
    }
    for (id, balance, held) in &accounts {
        assert_eq!(running.get(id.as_str()).copied().unwrap_or(0), *balance, "{id}: journal total is not the balance");
        let holding: i64 = reservations
            .values()
            .filter(|(a, _, state, _)| a == id && state == "held")
            .map(|(_, amount, _, _)| amount)
            .sum();
        assert_eq!(holding, *held, "{id}: held is not the sum of held reservations");
    }
    for (id, (_, _, state, charged)) in &reservations {
        let want: &[&str] = match state.as_str() {
            "held" => &["reserve"],
            "committed" => &["reserve", "commit"],
            "released" => &["reserve", "release"],
            _ => &["reserve", "expire"],
        };
        assert_eq!(
            rows_of.get(id.as_str()).map(Vec::as_slice).unwrap_or_default(),
            want,
            "reservation {id} is {state}"
        );
        assert_eq!(charged.is_some(), state == "committed", "reservation {id}");
    }
    sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
    reservations.into_iter().map(|(id, (_, amount, state, charged))| (id, (state, amount, charged))).collect()
}

/// What the clients were told: reservation id per acknowledged request id, and acknowledged commits.
#[derive(Default)]
struct Acknowledged {
    reserved: BTreeMap<String, String>,
    committed: BTreeSet<String>,
}

/// Sends batches of reservations and commits (and single calls) until the service stops answering.
async fn load_until_killed(base: String, client: String, acked: Arc<Mutex<Acknowledged>>) {
    let http = reqwest::Client::new();
    let post =
        |path: String, body: Value| http.post(format!("{base}{path}")).bearer_auth(SERVICE_TOKEN).json(&body).send();
    for round in 0.. {
        let ids: Vec<String> = (0..40).map(|i| format!("c{client}-{round}-{i}")).collect();
        let ops: Vec<Value> = ids.iter().map(|id| reserve("acme", 3, id)).collect();
        let Ok(response) = post("/v1/batch".into(), json!({ "operations": ops })).await else { return };
        let Ok(answer) = response.json::<Value>().await else { return };
        let mut commits = Vec::new();
        for (id, result) in ids.iter().zip(answer["results"].as_array().unwrap()) {
            assert_eq!(result["status"], 201, "{result}");
            let reservation = result["body"]["reservation_id"].as_str().unwrap().to_owned();
            acked.lock().unwrap().reserved.insert(id.clone(), reservation.clone());
            commits.push(reservation);
        }
        let ops: Vec<Value> =
            commits.iter().map(|id| json!({ "op": "commit", "reservation_id": id, "amount": 2 })).collect();
        let Ok(response) = post("/v1/batch".into(), json!({ "operations": ops })).await else { return };
        let Ok(answer) = response.json::<Value>().await else { return };
        for (id, result) in commits.iter().zip(answer["results"].as_array().unwrap()) {
            assert_eq!(result["status"], 200, "{result}");
            acked.lock().unwrap().committed.insert(id.clone());
        }
        // And a single pair, as a gateway without batching sends.
        let single = format!("s{client}-{round}");
        let body = json!({ "account": "acme", "amount": 3, "request_id": single, "route": "/api" });
        let Ok(response) = post("/v1/reservations".into(), body).await else { return };
        let Ok(answer) = response.json::<Value>().await else { return };
        let reservation = answer["reservation_id"].as_str().unwrap().to_owned();
        acked.lock().unwrap().reserved.insert(single, reservation.clone());
        let Ok(response) = post(format!("/v1/reservations/{reservation}/commit"), json!({ "amount": 2 })).await else {
            return;
        };
        if response.status() == StatusCode::OK {
            acked.lock().unwrap().committed.insert(reservation);
        }
    }
}

async fn sigkill_mid_batch_loses_nothing_acknowledged(db: Db) {
    const FUNDS: i64 = 1_000_000_000;
    let mut svc = Service::start(&db);
    svc.funded_account("acme", FUNDS).await;
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    for (life, kill_after) in [400, 700, 250].into_iter().enumerate() {
        let clients: Vec<_> = (0..6)
            .map(|client| {
                tokio::spawn(load_until_killed(svc.base.clone(), format!("{life}.{client}"), Arc::clone(&acked)))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        svc.signal("KILL");
        for client in clients {
            client.await.unwrap();
        }
        drop(svc);
        let reservations = check_ledger(&db).await;
        svc = Service::start(&db);
        let told = acked.lock().unwrap();
        assert!(told.committed.len() > 40, "too little got done to test anything: {}", told.committed.len());
        for id in told.reserved.values() {
            let (_, amount, _) = reservations.get(id).unwrap_or_else(|| panic!("acknowledged {id} is lost"));
            assert_eq!(*amount, 3);
        }
        for id in &told.committed {
            let (state, _, charged) = &reservations[id];
            assert_eq!((state.as_str(), *charged), ("committed", Some(2)), "acknowledged commit of {id}");
        }
    }
    // The restarted service agrees with what its predecessors acknowledged.
    let reserved = acked.lock().unwrap().reserved.clone();
    for (request_id, id) in reserved.iter().take(50) {
        let (status, body) = svc.reserve("acme", 3, request_id).await;
        assert_eq!((status, &body["reservation_id"]), (StatusCode::OK, &json!(id)), "{body}");
    }
}

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

async fn the_ledger_adds_up_after_a_concurrent_soak(db: Db) {
    let svc = Service::start(&db);
    // A second instance on the same database, as several services behind one ledger.
    let twin = Service::start(&db);
    let accounts = ["a", "b", "c"];
    for (account, funds) in accounts.iter().zip([300, 1_000, 50]) {
        svc.funded_account(account, funds).await;
    }
    let services = [Arc::new(svc), Arc::new(twin)];
    let tasks: Vec<_> = (0..12u64)
        .map(|task| {
            let svc = Arc::clone(&services[usize::try_from(task % 2).unwrap()]);
            tokio::spawn(async move {
                let mut rng = Lcg(task + 1);
                let mut statuses = BTreeMap::<u16, usize>::new();
                let mut held = Vec::new();
                for step in 0..60 {
                    let account = accounts[usize::try_from(rng.below(3)).unwrap()];
                    let amount = i64::try_from(rng.below(20)).unwrap() + 1;
                    let request_id = format!("t{task}-{step}");
                    match rng.below(4) {
                        0 | 1 => {
                            let (status, body) = svc.reserve(account, amount, &request_id).await;
                            *statuses.entry(status.as_u16()).or_default() += 1;
                            if status == StatusCode::CREATED {
                                held.push((body["reservation_id"].as_str().unwrap().to_owned(), amount));
                            }
                        }
                        2 => {
                            // A batch mixing settlements of what this task holds with new holds.
                            let mut ops =
                                vec![reserve(account, amount, &request_id), reserve(account, amount, &request_id)];
                            for (id, reserved) in held.drain(..) {
                                let charge = i64::try_from(rng.below(u64::try_from(reserved).unwrap() + 2)).unwrap();
                                ops.push(match rng.below(3) {
                                    0 => json!({ "op": "release", "reservation_id": id }),
                                    _ => json!({ "op": "commit", "reservation_id": id, "amount": charge }),
                                });
                                ops.push(json!({ "op": "release", "reservation_id": id }));
                            }
                            for (status, _) in batch(&svc, ops).await {
                                *statuses.entry(status).or_default() += 1;
                            }
                        }
                        _ => {
                            if let Some((id, reserved)) = held.pop() {
                                let (status, _) = svc.commit(&id, Some(reserved / 2)).await;
                                *statuses.entry(status.as_u16()).or_default() += 1;
                                let (status, _) = svc.release(&id).await;
                                *statuses.entry(status.as_u16()).or_default() += 1;
                            }
                        }
                    }
                }
                statuses
            })
        })
        .collect();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for task in tasks {
        for (status, n) in task.await.unwrap() {
            *statuses.entry(status).or_default() += n;
        }
    }
    // The mix reached every kind of answer it was built to reach.
    for status in [200, 201, 402, 409, 422] {
        assert!(statuses.contains_key(&status), "no {status} in {statuses:?}");
    }
    assert!(!statuses.keys().any(|s| *s >= 500), "{statuses:?}");
    check_ledger(&db).await;
    for account in accounts {
        services[0].journal(account).await;
    }
}
