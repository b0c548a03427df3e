//! What can go wrong in a call.

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::headers::RateLimitInfo;

/// The last answer of a call that was not retried any further.
#[derive(Debug, Clone)]
pub struct LastResponse {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl LastResponse {
    /// The rate-limit headers it carried.
    pub fn rate_limit(&self) -> RateLimitInfo {
        RateLimitInfo::parse(&self.headers)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a call ended without a usable response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server kept answering a retryable status (429, 502, 503, 504)
    /// until the retries ran out, or asked for a wait the policy would not
    /// make. Carries the last answer.
    #[error("gave up after {attempts} attempt(s): last answer {}", last.status)]
    GaveUp {
        /// Attempts made (1 + retries).
        attempts: u32,
        /// The last answer.
        last: Box<LastResponse>,
    },
    /// The request could not be sent or its answer not read. Not retried:
    /// it may have reached the server.
    #[error("request failed after {attempts} attempt(s)")]
    Transport {
        /// Attempts made.
        attempts: u32,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
}

impl Error {
    /// The last answer, when there was one.
    pub fn last_response(&self) -> Option<&LastResponse> {
        match self {
            Error::GaveUp { last, .. } => Some(last),
            Error::Transport { .. } => None,
        }
    }

    /// Attempts made (1 + retries).
    pub fn attempts(&self) -> u32 {
        match self {
            Error::GaveUp { attempts, .. } | Error::Transport { attempts, .. } => *attempts,
        }
    }
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The target is not an `http://` or `https://` URL.
    #[error("target `{url}`: {reason}")]
    Target {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--header` is not `name: value`.
    #[error("header `{0}`: expected `name: value` with a valid name and value")]
    Header(String),
    /// A rate or concurrency of 0, or a zero duration.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// The open loop's thread or its runtime could not start (out of
    /// threads or file descriptors).
    #[error("cannot start the load thread: {0}")]
    Runtime(#[source] std::io::Error),
}
