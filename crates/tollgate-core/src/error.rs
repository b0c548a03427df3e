//! Errors of the core crate. A denial is not an error: see [`crate::Decision`].

use std::fmt;

/// Where in a policy file a problem is: file, 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One problem in a policy file, with its location and a plain-language fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{file}: cannot read the policy file: {source}")]
    Read {
        /// File name.
        file: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, wrong type or unknown field.
    #[error("{at}: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// What the parser said, with a hint where we have one.
        message: String,
    },
    /// A number that must be positive is zero or negative.
    #[error("{at}: `{field}` must be a positive whole number, not {value}; {fix}")]
    NotPositive {
        /// Where.
        at: Location,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: i64,
        /// How to fix it.
        fix: &'static str,
    },
    /// A name that refers to nothing defined.
    #[error("{at}: {kind} `{name}` is not defined; defined {kind}s: {known}")]
    UnknownReference {
        /// Where.
        at: Location,
        /// `limit`, `operation`, `plan`, `attribute`.
        kind: &'static str,
        /// The name used.
        name: String,
        /// The names that exist, comma-separated.
        known: String,
    },
    /// An operation costs more than a limit can ever hold.
    #[error(
        "{at}: cost {cost} of operation `{operation}` exceeds capacity {capacity} of limit `{limit}`; such requests can never pass: lower the cost or raise the capacity"
    )]
    CostAboveCapacity {
        /// Where.
        at: Location,
        /// The operation's cost for the limit.
        cost: u64,
        /// The limit's capacity.
        capacity: u64,
        /// Limit name.
        limit: String,
        /// Operation name.
        operation: String,
    },
    /// Two operations match the same requests and no precedence rule separates them.
    #[error(
        "{at}: path `{pattern}` of operation `{operation}` overlaps `{other_pattern}` of operation `{other}` (at {other_at}); the same request would match both: make one more specific or merge them"
    )]
    OverlappingPaths {
        /// Where.
        at: Location,
        /// The pattern.
        pattern: String,
        /// Its operation.
        operation: String,
        /// The other pattern.
        other_pattern: String,
        /// The other operation.
        other: String,
        /// Where the other one is.
        other_at: Location,
    },
    /// Any other invalid value; the message says what to write instead.
    #[error("{at}: {message}")]
    Invalid {
        /// Where.
        at: Location,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Every problem found in a policy file, in file order.
#[derive(Debug)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A store could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The in-memory store holds its maximum number of live counters and none
    /// of them is fresh enough to drop.
    #[error("counter capacity reached ({cap} live counters)")]
    CounterCapReached {
        /// The configured cap.
        cap: usize,
    },
    /// The store did not answer in time.
    #[error("store timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The store is unreachable or refused the call.
    #[error("store unavailable: {0}")]
    Unavailable(&'static str),
}

impl StoreError {
    /// Whether trying again later may succeed; drives each limit's fail-open or
    /// fail-closed behaviour.
    pub fn is_transient(&self) -> bool {
        true
    }
}
