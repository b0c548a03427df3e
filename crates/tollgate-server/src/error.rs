//! The one place where errors become HTTP answers: status, JSON `code`, message.
//!
//! Body shape (DESIGN.md): `{"error": {"code": "...", "message": "...", ...}}`
//! plus fields that help the caller (`limit`, `retry_after_s`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What happened, for people.
    pub message: String,
    /// Extra fields merged into the `error` object.
    pub extra: Map<String, Value>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    /// Adds a field to the `error` object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// 400 malformed input.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 because a store or the database cannot be reached.
    pub fn unavailable(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what} unavailable; try again shortly"),
        )
    }

    /// 401 on the admin API.
    pub fn admin_unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl From<tollgate_ledger::LedgerError> for ApiError {
    fn from(e: tollgate_ledger::LedgerError) -> ApiError {
        use tollgate_ledger::LedgerError as L;
        match &e {
            L::NotFound { .. } => ApiError::not_found(e.to_string()),
            L::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            L::InvalidAmount { .. } => ApiError::bad_request(e.to_string()),
            _ => {
                tracing::warn!(error = %e, "ledger error");
                ApiError::unavailable("database")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A `retry_after_s` field is also sent as `Retry-After`.
        let retry = self.extra.get("retry_after_s").and_then(Value::as_u64);
        let mut error = Map::new();
        error.insert("code".into(), Value::from(self.code));
        error.insert("message".into(), Value::from(self.message));
        error.extend(self.extra);
        let mut r = json_response(self.status, &json!({ "error": error }));
        if let Some(s) = retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A JSON response with a status.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An error and its causes, `outer: inner: innermost`, for the log: why a
/// connection failed (refused, a certificate that did not verify) is in the
/// causes. Callers pass errors that carry no key, request or URL.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}
