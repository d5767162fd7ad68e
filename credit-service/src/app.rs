//! The HTTP API: routes, bearer-token roles, request validation, JSON in and out.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::error::{AppError, LedgerError};
use crate::ledger::{now_ms, GrantAnswer, Op, Outcome, Report, Usage, MAX_AMOUNT, MAX_BALANCE};
use crate::store::Ledger;

/// Request bodies are a few short fields; anything larger is a mistake or an attack.
const MAX_BODY: usize = 16 * 1024;
/// The most operations one `POST /v1/batch` may carry, and the body that can hold them.
const MAX_BATCH: usize = 1000;
const MAX_BATCH_BODY: usize = 1024 * 1024;
/// `POST /v1/grants`: reports per call, and a body that holds them with a few policies each.
const MAX_REPORTS: usize = 1000;
const MAX_GRANTS_BODY: usize = 4 * 1024 * 1024;
/// Policies one report may carry usage for: a gateway has a handful.
const MAX_POLICIES: usize = 32;
const DEFAULT_LIFETIME_SECONDS: i64 = 60;
const MAX_LIFETIME_SECONDS: i64 = 3600;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// The widest usage query, in buckets: a month of hours, a year of days.
const MAX_HOURS: i64 = 31 * 24;
const MAX_DAYS: i64 = 366;
/// The longest request id, route or reference kept.
const MAX_TEXT: usize = 256;
const MAX_ACCOUNT_ID: usize = 128;
/// Journal rows per page.
const MAX_PAGE: i64 = 1000;

pub struct AppState {
    pub ledger: Ledger,
    /// SHA-256 of each token: comparing fixed-size digests in constant time leaks neither the tokens
    /// nor their lengths.
    service_token: [u8; 32],
    admin_token: [u8; 32],
}

impl AppState {
    pub fn new(ledger: Ledger, service_token: &str, admin_token: &str) -> Self {
        Self { ledger, service_token: digest(service_token), admin_token: digest(admin_token) }
    }
}

fn digest(token: &str) -> [u8; 32] {
    hmac_sha256::Hash::hash(token.as_bytes())
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/accounts/{id}", put(create_account).get(get_account))
        .route("/v1/accounts/{id}/credits", post(top_up))
        .route("/v1/accounts/{id}/transactions", get(transactions))
        .route("/v1/reservations", post(reserve))
        .route("/v1/reservations/{id}/commit", post(commit))
        .route("/v1/reservations/{id}/release", post(release))
        .route("/v1/accounts/{id}/usage", get(usage))
        .route("/v1/batch", post(batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY)))
        .route("/v1/grants", post(grants).layer(DefaultBodyLimit::max(MAX_GRANTS_BODY)))
        .fallback(|| async { AppError::NoRoute })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        // A client that hangs up drops its handler, harmlessly: a write it queued is finished by
        // the ledger's writer anyway (see store.rs), and a read holds no transaction.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

// ---- who may call what -------------------------------------------------------------------------

/// A caller proven to hold a token of role `R`. Taken first in every handler, so nothing about the
/// request is looked at, or echoed back, before the caller is known.
struct Caller<R>(PhantomData<R>);

/// The gateway: reservations, commit, release, grants.
struct Service;
/// Operators: accounts, top-ups, the journal.
struct Admin;
/// Either of them: reading a balance or usage.
struct AnyRole;

trait Role {
    fn allows(state: &AppState, token: &[u8; 32]) -> bool;
}

impl Role for Service {
    fn allows(state: &AppState, token: &[u8; 32]) -> bool {
        token.ct_eq(&state.service_token).into()
    }
}

impl Role for Admin {
    fn allows(state: &AppState, token: &[u8; 32]) -> bool {
        token.ct_eq(&state.admin_token).into()
    }
}

impl Role for AnyRole {
    fn allows(state: &AppState, token: &[u8; 32]) -> bool {
        // Both comparisons always run: which token matched takes no longer than a miss.
        (token.ct_eq(&state.service_token) | token.ct_eq(&state.admin_token)).into()
    }
}

impl<R: Role> FromRequestParts<Arc<AppState>> for Caller<R> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, AppError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(AppError::Unauthorized)?;
        if R::allows(state, &digest(token)) {
            Ok(Self(PhantomData))
        } else {
            Err(AppError::Unauthorized)
        }
    }
}

// ---- extractors that answer in the service's JSON error format ----------------------------------

/// An account id from the path, checked.
struct AccountId(String);

impl<S: Send + Sync> FromRequestParts<S> for AccountId {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| INVALID_ACCOUNT)?;
        account_id(id).map(Self)
    }
}

/// A reservation id from the path. One that cannot be ours is simply not found, without a lookup.
struct ReservationId(String);

impl<S: Send + Sync> FromRequestParts<S> for ReservationId {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| AppError::NoRoute)?;
        reservation_id(id).map(Self)
    }
}

/// A reservation id that can be ours; any other is simply not found, without a lookup.
fn reservation_id(id: String) -> Result<String, AppError> {
    let ours = id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ours {
        Ok(id)
    } else {
        Err(LedgerError::ReservationNotFound(id).into())
    }
}

/// A JSON body of type `T`, of at most `LIMIT` bytes (the route's `DefaultBodyLimit`). An empty
/// body reads as `{}`, so calls whose fields are all optional (commit, release, account creation)
/// may send none.
struct Body<T, const LIMIT: usize = MAX_BODY>(T);

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S> for Body<T, LIMIT> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::BodyTooLarge(LIMIT)
            } else {
                AppError::UnreadableBody
            }
        })?;
        let json: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        serde_json::from_slice(json).map(Self).map_err(AppError::InvalidJson)
    }
}

// ---- validation ----------------------------------------------------------------------------------

const INVALID_ACCOUNT: AppError =
    AppError::InvalidField { field: "account", reason: "must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -" };

fn account_id(id: String) -> Result<String, AppError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ACCOUNT_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b));
    if valid {
        Ok(id)
    } else {
        Err(INVALID_ACCOUNT)
    }
}

fn amount(field: &'static str, value: i64) -> Result<i64, AppError> {
    if (1..=MAX_AMOUNT).contains(&value) {
        Ok(value)
    } else {
        Err(AppError::InvalidField { field, reason: "must be a whole number from 1 to 1000000000000" })
    }
}

/// What a commit may charge. Zero is valid: the upstream may report that the call cost nothing.
fn charge(value: Option<i64>) -> Result<Option<i64>, AppError> {
    match value {
        Some(v) if !(0..=MAX_AMOUNT).contains(&v) => Err(AppError::InvalidField {
            field: "amount",
            reason: "must be a whole number from 0 to the amount reserved",
        }),
        _ => Ok(value),
    }
}

fn text(field: &'static str, value: String) -> Result<String, AppError> {
    if value.is_empty() || value.chars().count() > MAX_TEXT {
        Err(AppError::InvalidField { field, reason: "must be 1 to 256 characters" })
    } else if value.chars().any(char::is_control) {
        Err(AppError::InvalidField { field, reason: "must not contain control characters" })
    } else {
        Ok(value)
    }
}

// ---- wire types ----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpRequest {
    amount: i64,
    reference: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveRequest {
    account: String,
    amount: i64,
    request_id: String,
    route: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    #[serde(default)]
    amount: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    after: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct AccountCreated {
    account: String,
    balance: i64,
}

#[derive(Serialize)]
struct AccountView {
    account: String,
    balance: i64,
    held: i64,
}

#[derive(Serialize)]
struct TopUpView {
    balance: i64,
    transaction_id: i64,
}

#[derive(Serialize)]
struct Transactions {
    account: String,
    transactions: Vec<EntryView>,
}

#[derive(Serialize)]
struct EntryView {
    id: i64,
    kind: String,
    amount: i64,
    balance_after: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_id: Option<String>,
    /// `grant_use` rows: the credits of the grant's hold they charged.
    #[serde(skip_serializing_if = "Option::is_none")]
    charged: Option<i64>,
    /// RFC 3339, UTC, milliseconds.
    created_at: String,
}

/// One operation of `POST /v1/batch`: the body of the single call, with `op` saying which, and the
/// reservation id (which the single call takes from its path) as a field.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum BatchOp {
    Reserve(ReserveRequest),
    Commit {
        reservation_id: String,
        #[serde(default)]
        amount: Option<i64>,
    },
    Release {
        reservation_id: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    operations: Vec<BatchOp>,
}

#[derive(Serialize)]
struct BatchResponse {
    results: Vec<BatchResult>,
}

/// What the single call would have answered: its status and its JSON body.
#[derive(Serialize)]
struct BatchResult {
    status: u16,
    body: BatchBody,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchBody {
    Answer(Answer),
    Error(Value),
}

#[derive(Serialize)]
struct Reserved {
    reservation_id: String,
    balance: i64,
}

#[derive(Serialize)]
struct Committed {
    charged: i64,
    balance: i64,
}

#[derive(Serialize)]
struct Released {
    released: i64,
    balance: i64,
}

/// The body of a reservation, a commit or a release, whether it answers a call of its own or is
/// one result of a batch.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    Reserved(Reserved),
    Committed(Committed),
    Released(Released),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsRequest {
    instance: String,
    reports: Vec<ReportRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportRequest {
    account: String,
    #[serde(default)]
    grant_id: Option<String>,
    used_total: i64,
    #[serde(default)]
    usage: BTreeMap<String, UsageRequest>,
    want_total: i64,
    min_grant: i64,
    max_grant: i64,
    #[serde(default)]
    lifetime_seconds: Option<i64>,
    #[serde(default)]
    close: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageRequest {
    credits: i64,
    requests: i64,
}

#[derive(Serialize)]
struct GrantsResponse {
    results: Vec<GrantResult>,
}

#[derive(Serialize)]
struct GrantResult {
    status: u16,
    body: GrantBody,
}

#[derive(Serialize)]
#[serde(untagged)]
enum GrantBody {
    Grant(GrantView),
    Problem(Value),
}

#[derive(Serialize)]
struct GrantView {
    grant_id: String,
    granted_total: i64,
    used_total: i64,
    lifetime_seconds: i64,
    #[serde(rename = "final")]
    last: bool,
    balance: i64,
    available: i64,
}

impl From<GrantAnswer> for GrantView {
    fn from(a: GrantAnswer) -> Self {
        Self {
            grant_id: a.grant_id,
            granted_total: a.granted_total,
            used_total: a.used_total,
            lifetime_seconds: a.lifetime_ms / 1000,
            last: a.last,
            balance: a.balance,
            available: a.available,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    fn millis(self) -> i64 {
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => DAY_MS,
        }
    }

    fn most_buckets(self) -> i64 {
        match self {
            Self::Hour => MAX_HOURS,
            Self::Day => MAX_DAYS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    from: Option<i64>,
    to: Option<i64>,
    granularity: Option<Granularity>,
}

#[derive(Serialize)]
struct UsageView {
    account: String,
    granularity: &'static str,
    usage: Vec<UsageBucket>,
}

#[derive(Serialize)]
struct UsageBucket {
    policy: String,
    start: i64,
    credits: i64,
    requests: i64,
}

/// 201 for what this call created, 200 for what an earlier call did.
fn created_if(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

type Reply<T> = Result<(StatusCode, Json<T>), AppError>;
type St = State<Arc<AppState>>;

/// An outcome the operation cannot have: a bug, answered as one.
fn unexpected(outcome: Outcome) -> AppError {
    LedgerError::Internal(format!("unexpected outcome {outcome:?}")).into()
}

// ---- handlers ------------------------------------------------------------------------------------

async fn create_account(
    _: Caller<Admin>,
    State(s): St,
    AccountId(id): AccountId,
    _: Body<Empty>,
) -> Reply<AccountCreated> {
    match s.ledger.one(Op::CreateAccount { account: id.clone() }).await? {
        Outcome::Account { account, created } => {
            Ok((created_if(created), Json(AccountCreated { account: id, balance: account.balance })))
        }
        other => Err(unexpected(other)),
    }
}

async fn get_account(_: Caller<AnyRole>, State(s): St, AccountId(id): AccountId) -> Reply<AccountView> {
    let account = s.ledger.account(&id).await?;
    Ok((StatusCode::OK, Json(AccountView { account: id, balance: account.balance, held: account.held })))
}

async fn top_up(
    _: Caller<Admin>,
    State(s): St,
    AccountId(id): AccountId,
    Body(req): Body<TopUpRequest>,
) -> Reply<TopUpView> {
    let amount = amount("amount", req.amount)?;
    let reference = text("reference", req.reference)?;
    match s.ledger.one(Op::TopUp { account: id, amount, reference }).await? {
        Outcome::TopUp(done) => Ok((
            created_if(!done.replayed),
            Json(TopUpView { balance: done.balance, transaction_id: done.transaction_id }),
        )),
        other => Err(unexpected(other)),
    }
}

async fn transactions(
    _: Caller<Admin>,
    State(s): St,
    AccountId(id): AccountId,
    page: Result<Query<Page>, QueryRejection>,
) -> Reply<Transactions> {
    let Query(page) = page.map_err(|rejection| AppError::InvalidQuery(rejection.body_text()))?;
    let limit = page.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::InvalidField { field: "limit", reason: "must be from 1 to 1000" });
    }
    let entries = s.ledger.transactions(&id, page.after.unwrap_or(0), limit).await?;
    let transactions = entries
        .into_iter()
        .map(|e| EntryView {
            id: e.id,
            kind: e.kind,
            amount: e.amount,
            balance_after: e.balance_after,
            reservation_id: e.reservation_id,
            reference: e.reference,
            grant_id: e.grant_id,
            charged: e.charged,
            created_at: rfc3339(e.created_at_ms),
        })
        .collect();
    Ok((StatusCode::OK, Json(Transactions { account: id, transactions })))
}

async fn reserve(_: Caller<Service>, State(s): St, Body(req): Body<ReserveRequest>) -> Reply<Answer> {
    let (status, answer) = answer(s.ledger.one(reserve_op(req)?).await)?;
    Ok((status, Json(answer)))
}

async fn commit(
    _: Caller<Service>,
    State(s): St,
    ReservationId(id): ReservationId,
    Body(req): Body<CommitRequest>,
) -> Reply<Answer> {
    let op = Op::Commit { reservation: id, amount: charge(req.amount)? };
    let (status, answer) = answer(s.ledger.one(op).await)?;
    Ok((status, Json(answer)))
}

async fn release(_: Caller<Service>, State(s): St, ReservationId(id): ReservationId, _: Body<Empty>) -> Reply<Answer> {
    let (status, answer) = answer(s.ledger.one(Op::Release { reservation: id }).await)?;
    Ok((status, Json(answer)))
}

/// Many reservations, commits and releases in one call and one group commit; each answered with
/// exactly what its single call would have answered. The call itself fails only when the token or
/// the envelope is wrong.
async fn batch(
    _: Caller<Service>,
    State(s): St,
    Body(req): Body<BatchRequest, MAX_BATCH_BODY>,
) -> Reply<BatchResponse> {
    if req.operations.is_empty() || req.operations.len() > MAX_BATCH {
        return Err(AppError::InvalidField { field: "operations", reason: "must hold 1 to 1000 operations" });
    }
    // Operations that fail validation are answered without reaching the ledger; their slot stays
    // filled while the rest are submitted together.
    let mut answers: Vec<Option<Result<(StatusCode, Answer), AppError>>> = Vec::with_capacity(req.operations.len());
    let mut ops = Vec::with_capacity(req.operations.len());
    for op in req.operations {
        match batch_op(op) {
            Ok(op) => {
                ops.push(op);
                answers.push(None);
            }
            Err(refused) => answers.push(Some(Err(refused))),
        }
    }
    let mut outcomes = s.ledger.submit(ops).await.into_iter();
    let results = answers
        .into_iter()
        .map(|checked| {
            let answered = checked.unwrap_or_else(|| answer(outcomes.next().unwrap_or(Err(LedgerError::WriterGone))));
            match answered {
                Ok((status, answer)) => BatchResult { status: status.as_u16(), body: BatchBody::Answer(answer) },
                Err(refused) => {
                    let (status, body) = refused.parts();
                    BatchResult { status: status.as_u16(), body: BatchBody::Error(body) }
                }
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(BatchResponse { results })))
}

/// One gateway's reports on its grants, many accounts at once, in one group commit; each report
/// answered on its own (a refused one is an RFC 9457 problem, as the grants contract has it). The
/// call itself fails only when the token or the envelope is wrong.
async fn grants(
    _: Caller<Service>,
    State(s): St,
    Body(req): Body<GrantsRequest, MAX_GRANTS_BODY>,
) -> Reply<GrantsResponse> {
    if req.reports.is_empty() || req.reports.len() > MAX_REPORTS {
        return Err(AppError::InvalidField { field: "reports", reason: "must hold 1 to 1000 reports" });
    }
    let instance = account_id(req.instance).map_err(|_| AppError::InvalidField {
        field: "instance",
        reason: "must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -",
    })?;
    let mut checked = Vec::with_capacity(req.reports.len());
    let mut ops = Vec::with_capacity(req.reports.len());
    for report in req.reports {
        match report_op(&instance, report) {
            Ok(op) => {
                ops.push(op);
                checked.push(None);
            }
            Err(refused) => checked.push(Some(refused)),
        }
    }
    let mut outcomes = s.ledger.submit(ops).await.into_iter();
    let results = checked
        .into_iter()
        .map(|refused| {
            let answered = match refused {
                Some(refused) => Err(refused),
                None => match outcomes.next().unwrap_or(Err(LedgerError::WriterGone)) {
                    Ok(Outcome::Grant(answer)) => Ok(answer),
                    Ok(other) => Err(unexpected(other)),
                    Err(e) => Err(e.into()),
                },
            };
            match answered {
                Ok(answer) => GrantResult { status: 200, body: GrantBody::Grant(answer.into()) },
                Err(refused) => {
                    let (status, body) = refused.problem();
                    GrantResult { status: status.as_u16(), body: GrantBody::Problem(body) }
                }
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(GrantsResponse { results })))
}

fn report_op(instance: &str, req: ReportRequest) -> Result<Op, AppError> {
    let total = |field: &'static str, value: i64| {
        if (0..=MAX_BALANCE).contains(&value) {
            Ok(value)
        } else {
            Err(AppError::InvalidField { field, reason: "must be a whole number from 0 to 10^15" })
        }
    };
    let lifetime = req.lifetime_seconds.unwrap_or(DEFAULT_LIFETIME_SECONDS);
    if !(1..=MAX_LIFETIME_SECONDS).contains(&lifetime) {
        return Err(AppError::InvalidField { field: "lifetime_seconds", reason: "must be from 1 to 3600" });
    }
    let min_grant = amount("min_grant", req.min_grant)?;
    let max_grant = amount("max_grant", req.max_grant)?;
    if max_grant < min_grant {
        return Err(AppError::InvalidField { field: "max_grant", reason: "must be at least min_grant" });
    }
    if req.usage.len() > MAX_POLICIES {
        return Err(AppError::InvalidField { field: "usage", reason: "must name at most 32 policies" });
    }
    let mut usage = BTreeMap::new();
    for (policy, u) in req.usage {
        let u = Usage { credits: total("usage.credits", u.credits)?, requests: total("usage.requests", u.requests)? };
        usage.insert(text("usage", policy)?, u);
    }
    Ok(Op::Report(Report {
        account: account_id(req.account)?,
        instance: instance.to_owned(),
        grant: req.grant_id.map(grant_id).transpose()?,
        used_total: total("used_total", req.used_total)?,
        usage,
        want_total: total("want_total", req.want_total)?,
        min_grant,
        max_grant,
        lifetime_ms: lifetime * 1000,
        close: req.close,
    }))
}

/// A grant id that can be ours; any other names no live grant, which is what the gateway is told.
fn grant_id(id: String) -> Result<String, AppError> {
    let ours = id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ours {
        Ok(id)
    } else {
        Err(LedgerError::GrantEnded(Some(id)).into())
    }
}

/// What an account spent, per policy and hour or day, over a time range widened to whole buckets.
async fn usage(
    _: Caller<AnyRole>,
    State(s): St,
    AccountId(id): AccountId,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Reply<UsageView> {
    let Query(query) = query.map_err(|rejection| AppError::InvalidQuery(rejection.body_text()))?;
    let granularity = query.granularity.unwrap_or(Granularity::Hour);
    let bucket = granularity.millis();
    let to = query.to.unwrap_or_else(now_ms);
    let from = query.from.unwrap_or(to - DAY_MS);
    if !(0..=MAX_BALANCE).contains(&from) || !(0..=MAX_BALANCE).contains(&to) {
        return Err(AppError::InvalidField { field: "from", reason: "from and to must be unix times in ms" });
    }
    // Whole buckets: the first one holding `from`, up to the one holding the last ms before `to`.
    let (first, end) = (from - from % bucket, (to + bucket - 1) / bucket * bucket);
    if to <= from || (end - first) / bucket > granularity.most_buckets() {
        return Err(AppError::InvalidField {
            field: "to",
            reason: "must be after from, at most 31 days of hours or 366 days of days later",
        });
    }
    let rows = s.ledger.usage(&id, first, end, bucket).await?;
    let usage = rows
        .into_iter()
        .map(|r| UsageBucket { policy: r.policy, start: r.start, credits: r.credits, requests: r.requests })
        .collect();
    Ok((StatusCode::OK, Json(UsageView { account: id, granularity: granularity.name(), usage })))
}

fn reserve_op(req: ReserveRequest) -> Result<Op, AppError> {
    Ok(Op::Reserve {
        account: account_id(req.account)?,
        amount: amount("amount", req.amount)?,
        request_id: text("request_id", req.request_id)?,
        route: text("route", req.route)?,
    })
}

fn batch_op(op: BatchOp) -> Result<Op, AppError> {
    match op {
        BatchOp::Reserve(req) => reserve_op(req),
        BatchOp::Commit { reservation_id: id, amount } => {
            Ok(Op::Commit { reservation: reservation_id(id)?, amount: charge(amount)? })
        }
        BatchOp::Release { reservation_id: id } => Ok(Op::Release { reservation: reservation_id(id)? }),
    }
}

/// The status and body of a reservation's, a commit's or a release's outcome.
fn answer(outcome: Result<Outcome, LedgerError>) -> Result<(StatusCode, Answer), AppError> {
    match outcome? {
        Outcome::Hold(hold) => Ok((
            created_if(!hold.replayed),
            Answer::Reserved(Reserved { reservation_id: hold.reservation_id, balance: hold.balance }),
        )),
        Outcome::Committed { charged, balance } => {
            Ok((StatusCode::OK, Answer::Committed(Committed { charged, balance })))
        }
        Outcome::Released { released, balance } => {
            Ok((StatusCode::OK, Answer::Released(Released { released, balance })))
        }
        other => Err(unexpected(other)),
    }
}

fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}
