//! The service's errors, one enum per concern, and the one place that turns them into a status and a
//! JSON body `{error, message}` with a stable code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// What the ledger can refuse, or fail at.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("account {0:?} does not exist")]
    AccountNotFound(String),
    #[error("reservation {0:?} does not exist")]
    ReservationNotFound(String),
    #[error("the balance of {balance} is short of the {required} credits required")]
    InsufficientCredits { balance: i64, required: i64 },
    #[error("the reservation was {}; it can no longer be committed", if *.expired { "expired" } else { "released" })]
    ReservationReleased { expired: bool },
    #[error("the reservation was already committed; it can no longer be released")]
    ReservationCommitted,
    #[error("amount {amount} exceeds the {reserved} credits reserved")]
    AmountExceedsReservation { amount: i64, reserved: i64 },
    #[error("the top-up would take the account's credits over {max}")]
    BalanceLimit { max: i64 },
    /// Closed, expired, unknown, or another caller's: the gateway opens a fresh grant.
    #[error("{}", match .0 { Some(id) => format!("grant {id:?} is no longer live; open a new one"), None => "there is no live grant to close".to_owned() })]
    GrantEnded(Option<String>),
    /// Carries the scheme only: the rest of a URL may hold a password.
    #[error("--database must be sqlite://PATH, sqlite:PATH or postgres://… (got a {0:?} URL)")]
    UnsupportedUrl(String),
    #[error("applying migration {version} ({name}): {source}")]
    Migration { version: i64, name: &'static str, source: Box<LedgerError> },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The transaction of a whole batch failed; each of its operations carries the one error.
    #[error("{0}")]
    Batch(std::sync::Arc<LedgerError>),
    #[error("the ledger's writer has stopped")]
    WriterGone,
    #[error("the database holds an unexpected value in {0}")]
    Corrupt(&'static str),
    #[error("{0}")]
    Internal(String),
}

/// Everything a request can end in besides success.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("a valid bearer token for this call is required")]
    Unauthorized,
    #[error("request body: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("request body could not be read")]
    UnreadableBody,
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("query string: {0}")]
    InvalidQuery(String),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: &'static str },
    #[error("no such endpoint")]
    NoRoute,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl AppError {
    /// The status and stable code of each error; also what the README's error table lists.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::InvalidJson(_) | Self::UnreadableBody => (StatusCode::BAD_REQUEST, "invalid_json"),
            Self::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            Self::InvalidField { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            Self::NoRoute => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Ledger(e) => ledger_status(e),
        }
    }

    /// What the caller is told. Server errors are logged here, with the details the message
    /// leaves out (SQL, host names, paths).
    fn message(&self, status: StatusCode, code: &str) -> String {
        if status.is_server_error() {
            log::error!("{code}: {self}");
            match status {
                StatusCode::SERVICE_UNAVAILABLE => "the ledger is unavailable; retry later".to_owned(),
                _ => "internal error; see the service's log".to_owned(),
            }
        } else {
            self.to_string()
        }
    }

    /// The status and the JSON body `{error, message, …}` this error answers with, alone or as one
    /// result in a batch.
    pub fn parts(&self) -> (StatusCode, Value) {
        let (status, code) = self.status_and_code();
        let message = self.message(status, code);
        let mut body = json!({ "error": code, "message": message });
        match &self {
            Self::Ledger(LedgerError::InsufficientCredits { balance, required }) => {
                extend(&mut body, json!({ "balance": balance, "required": required }));
            }
            Self::Ledger(LedgerError::AmountExceedsReservation { amount, reserved }) => {
                extend(&mut body, json!({ "amount": amount, "reserved": reserved }));
            }
            _ => {}
        }
        (status, body)
    }

    /// The status and the RFC 9457 body `{type, title, status, detail}` of one report's result in
    /// `POST /v1/grants`, as the grants contract has it (the filter's own problem types share the
    /// `urn:tollgate:problem:` prefix). The `type` slug is the stable code with dashes.
    pub fn problem(&self) -> (StatusCode, Value) {
        let (status, code) = self.status_and_code();
        let detail = self.message(status, code);
        let body = json!({
            "type": format!("urn:tollgate:problem:{}", code.replace('_', "-")),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        (status, body)
    }
}

fn ledger_status(e: &LedgerError) -> (StatusCode, &'static str) {
    use LedgerError as L;
    match e {
        L::AccountNotFound(_) => (StatusCode::NOT_FOUND, "account_not_found"),
        L::ReservationNotFound(_) => (StatusCode::NOT_FOUND, "reservation_not_found"),
        L::InsufficientCredits { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
        L::ReservationReleased { .. } => (StatusCode::CONFLICT, "reservation_released"),
        L::ReservationCommitted => (StatusCode::CONFLICT, "reservation_committed"),
        L::AmountExceedsReservation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "amount_exceeds_reservation"),
        L::BalanceLimit { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "balance_limit"),
        L::GrantEnded(_) => (StatusCode::CONFLICT, "grant_ended"),
        L::Batch(inner) => ledger_status(inner),
        L::Database(db) if is_unavailable(db) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        L::Sqlite(db) if sqlite_unavailable(db) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        L::WriterGone => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        L::UnsupportedUrl(_) | L::Migration { .. } | L::Database(_) | L::Sqlite(_) | L::Corrupt(_) | L::Internal(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    }
}

/// SQLite's BUSY, LOCKED, IOERR, FULL and CANTOPEN: another process holds the file, or the disk
/// is in trouble. A retry may get past them.
fn sqlite_unavailable(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        error.sqlite_error_code(),
        Some(C::DatabaseBusy | C::DatabaseLocked | C::SystemIoFailure | C::DiskFull | C::CannotOpen)
    )
}

/// Errors a retry may get past: the database is down, overloaded, or busy. The gateway's failure mode
/// handles a 503 differently from a bug.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // PostgreSQL classes: connection exception, invalid authorization, transaction
            // rollback (serialization failure, deadlock), invalid catalog (the database is
            // gone), insufficient resources, operator intervention.
            let code = db.code().unwrap_or_default();
            ["08", "28", "40", "3D", "53", "57"].iter().any(|class| code.starts_with(class))
        }
        _ => false,
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn extend(body: &mut Value, more: Value) {
    if let (Value::Object(body), Value::Object(more)) = (body, more) {
        body.extend(more);
    }
}
