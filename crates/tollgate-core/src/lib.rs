//! # tollgate-core
//!
//! The heart of tollgate, a rate-limit, quota and credits gateway: the policy
//! model, the limit algorithms, the decision engine, the [`Store`] trait with
//! its in-memory implementation, and response headers. It embeds in any Rust
//! service, like `governor`, but with multi-limit policies, weighted costs,
//! soft and shadow modes, and pluggable stores.
//!
//! ```
//! use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Outcome, Request, policy};
//!
//! let policy = policy::parse(r#"
//!     [operations.upload]
//!     method = "POST"
//!     path = "/api/assets"
//!     cost = 20
//!
//!     [limits.bucket]
//!     algorithm = "token_bucket"
//!     capacity = 400
//!     refill = 100
//!     scope = ["account"]
//! "#, "inline.toml").expect("valid policy");
//!
//! let engine = Engine::with_clock(MemoryStore::default(), ManualClock::new(Nanos::from_secs(1_000)));
//! let op = policy.operation_for("POST", "/api/assets").unwrap();
//! let req = Request { account: "acme", ..Request::new(policy.default_plan, op) };
//! for _ in 0..20 {
//!     assert_eq!(engine.decide_now(&policy, &req).outcome, Outcome::Admitted);
//! }
//! let d = engine.decide_now(&policy, &req);
//! assert!(matches!(d.outcome, Outcome::Rejected { .. }));
//! assert_eq!(d.retry_after().as_millis(), 200);
//! ```
//!
//! Main types: [`policy::CompiledPolicy`] (from [`policy::parse`] or
//! [`policy::load`]), [`Engine`], [`Request`], [`Decision`], [`Store`],
//! [`MemoryStore`], [`Clock`]. The policy file format is in
//! `docs/policy.md`; the guarantees of each algorithm are on its module in
//! [`algorithm`].

pub mod algorithm;
pub mod clock;
pub mod decision;
pub mod engine;
pub mod error;
pub mod headers;
pub mod policy;
pub mod store;
mod value_hash;

pub use clock::{Clock, ManualClock, Nanos, SystemClock};
pub use decision::{Decision, LimitResult, Outcome};
pub use engine::{Engine, Request};
pub use error::{Location, PolicyError, PolicyErrors, StoreError};
pub use store::{Check, CounterKey, MemoryStore, Params, Store};
