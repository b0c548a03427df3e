//! The rate-limit headers of an answer, written straight into its header
//! map ([`add`]): the same headers and values as `headers::render` with
//! each value made by `HeaderValue::from_str`, for less work per answer.
//!
//! - Each value is written into a small buffer on the stack (not the 1 KB
//!   `ValueBuf`, zeroed per answer) and becomes a header value without a
//!   second UTF-8 check (every piece is a whole `&str`; `from_bytes` checks
//!   the bytes as `from_str` does). A value longer than [`SHORT`] (a very
//!   long limit name) has the whole set written again by `headers::render`,
//!   which cuts values as it always has.
//! - A `RateLimit-Policy` value is kept per thread with the policy and the
//!   results it was written from ([`kept`]): an answer for the same
//!   results shares it (a reference count) instead of writing, checking and
//!   copying it again. A decision's results are only matched against
//!   values written from the same policy (an `Arc` of it is kept, so its
//!   limits, and their names, cannot change under the value).
//! - `X-RateLimit-Limit` and `-Cost` values that repeat are shared the same
//!   way ([`repeated`]).

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use tollgate_core::Decision;
use tollgate_core::headers::{self, HeaderSink, ResponseKind};
use tollgate_core::policy::CompiledPolicy;

use super::names;
use crate::metric_cache::{PolicyItems, PolicyValue};

/// Longest value written on the stack; see the module's documentation.
const SHORT: usize = 256;

/// Adds the policy's rate-limit headers for `d`, answered as `kind`, to `out`.
pub fn add(
    policy: &Arc<CompiledPolicy>,
    d: &Decision,
    kind: ResponseKind,
    credits: Option<i64>,
    out: &mut HeaderMap,
) {
    let mut sink = Sink {
        policy,
        out: &mut *out,
        buf: [0; SHORT],
        len: 0,
        too_long: false,
        kept: None,
        keep: None,
    };
    headers::render_to(policy, d, kind, credits, &mut sink);
    if sink.too_long {
        // Those already inserted are replaced in place: same order.
        headers::render(policy, d, kind, credits, &mut |name, value| {
            if let (Some((n, _)), Ok(v)) = (header_name(name), HeaderValue::from_str(value)) {
                out.insert(n, v);
            }
        });
    }
}

struct Sink<'a> {
    policy: &'a Arc<CompiledPolicy>,
    out: &'a mut HeaderMap,
    buf: [u8; SHORT],
    len: usize,
    /// A value did not fit: nothing more is inserted (see [`add`]).
    too_long: bool,
    /// The kept `RateLimit-Policy` value found for the `end` that follows.
    kept: Option<HeaderValue>,
    /// What the `RateLimit-Policy` value being written is written from, to
    /// keep it at its `end`.
    keep: Option<PolicyItems>,
}

impl HeaderSink for Sink<'_> {
    fn text(&mut self, s: &str) {
        let end = self.len + s.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(s.as_bytes());
                self.len = end;
            }
            None => self.too_long = true,
        }
    }

    fn policy_value(&mut self, d: &Decision) -> bool {
        match kept::find(self.policy, d) {
            Some(v) => {
                self.kept = Some(v);
                true
            }
            None => {
                self.keep = Some(PolicyValue::from_results(d));
                false
            }
        }
    }

    fn end(&mut self, name: &str) {
        let len = std::mem::take(&mut self.len);
        let (kept, keep) = (self.kept.take(), self.keep.take());
        if self.too_long {
            return;
        }
        let Some((n, slot)) = header_name(name) else {
            return;
        };
        let text = &self.buf[..len];
        let value = match (kept, keep) {
            (Some(v), _) => Some(v),
            (None, Some(from)) if name == headers::RATELIMIT_POLICY => {
                let v = HeaderValue::from_bytes(text).ok();
                if let Some(v) = &v {
                    kept::put(self.policy, from, v.clone());
                }
                v
            }
            _ => match slot {
                Some(slot) => repeated::value(slot, text),
                None => HeaderValue::from_bytes(text).ok(),
            },
        };
        if let Some(v) = value {
            self.out.insert(n, v);
        }
    }
}

/// `RateLimit-Policy` values kept per thread (a few, replaced in turn).
mod kept {
    use std::cell::RefCell;
    use std::sync::Arc;

    use axum::http::HeaderValue;
    use tollgate_core::Decision;
    use tollgate_core::policy::CompiledPolicy;

    use crate::metric_cache::{PolicyItems, policy_items_match};

    /// Values kept per thread: enough for a few plans and operations.
    const SLOTS: usize = 4;

    struct Kept {
        policy: Arc<CompiledPolicy>,
        from: PolicyItems,
        value: HeaderValue,
    }

    thread_local! {
        /// The kept values, and the slot the next one goes to.
        static KEPT: RefCell<([Option<Kept>; SLOTS], usize)> =
            const { RefCell::new(([const { None }; SLOTS], 0)) };
    }

    /// The kept value of `policy` written from `d`'s results, if any.
    pub fn find(policy: &Arc<CompiledPolicy>, d: &Decision) -> Option<HeaderValue> {
        KEPT.with_borrow(|(slots, _)| {
            slots
                .iter()
                .flatten()
                .find(|k| Arc::ptr_eq(&k.policy, policy) && policy_items_match(&k.from, d))
                .map(|k| k.value.clone())
        })
    }

    /// Keeps `value`, written from `from` of `policy`. Values kept for
    /// another policy are dropped first: after a reload, the first value
    /// kept for the new policy lets the old one go (a thread keeps no
    /// replaced policy alive past its next request that writes a value).
    pub fn put(policy: &Arc<CompiledPolicy>, from: PolicyItems, value: HeaderValue) {
        KEPT.with_borrow_mut(|(slots, next)| {
            for slot in slots.iter_mut() {
                if slot
                    .as_ref()
                    .is_some_and(|k| !Arc::ptr_eq(&k.policy, policy))
                {
                    *slot = None;
                }
            }
            slots[*next] = Some(Kept {
                policy: Arc::clone(policy),
                from,
                value,
            });
            *next = (*next + 1) % SLOTS;
        });
    }
}

/// Header values that most answers repeat (`X-RateLimit-Limit`, `-Cost`),
/// kept per thread, one per slot: a value equal to the kept one is a shared
/// copy of it (a reference count) instead of a new allocation, copy and
/// check of its bytes. A different value replaces the kept one.
mod repeated {
    use std::cell::RefCell;

    use axum::http::HeaderValue;

    /// `X-RateLimit-Limit`.
    pub const LIMIT: usize = 0;
    /// `X-RateLimit-Cost`.
    pub const COST: usize = 1;
    const SLOTS: usize = 2;

    thread_local! {
        static KEPT: RefCell<[Option<HeaderValue>; SLOTS]> =
            const { RefCell::new([const { None }; SLOTS]) };
    }

    /// `text` as a header value (`None` if it cannot be one), shared with
    /// the value kept in `slot` when equal.
    pub fn value(slot: usize, text: &[u8]) -> Option<HeaderValue> {
        KEPT.with_borrow_mut(|kept| {
            let kept = &mut kept[slot];
            if let Some(v) = kept
                && v.as_bytes() == text
            {
                return Some(v.clone());
            }
            let v = HeaderValue::from_bytes(text).ok()?;
            *kept = Some(v.clone());
            Some(v)
        })
    }
}

/// The header name of a rate-limit field: the fixed names without parsing or
/// copying them, a policy's own (vendor) names parsed; with the
/// [`repeated`] slot of the fields whose values repeat.
fn header_name(name: &str) -> Option<(HeaderName, Option<usize>)> {
    Some(match name {
        headers::RETRY_AFTER => (header::RETRY_AFTER, None),
        headers::RATELIMIT_POLICY => (names::RATELIMIT_POLICY, None),
        headers::RATELIMIT => (names::RATELIMIT, None),
        "X-RateLimit-Limit" => (names::X_RATELIMIT_LIMIT, Some(repeated::LIMIT)),
        "X-RateLimit-Remaining" => (names::X_RATELIMIT_REMAINING, None),
        "X-RateLimit-Reset" => (names::X_RATELIMIT_RESET, None),
        "X-RateLimit-Cost" => (names::X_RATELIMIT_COST, Some(repeated::COST)),
        "X-Credits-Remaining" => (names::X_CREDITS_REMAINING, None),
        _ => (HeaderName::from_bytes(name.as_bytes()).ok()?, None),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::{HeaderMap, HeaderValue, header};
    use tollgate_core::headers::{self, ResponseKind};
    use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Request, policy};

    /// An upstream answer's headers, one of them a rate-limit field of its
    /// own (replaced in place).
    fn answer() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("ratelimit", HeaderValue::from_static("upstream's"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h
    }

    /// The headers as they were added before (each value of
    /// `headers::render` made by `HeaderValue::from_str` and inserted).
    fn expected(
        p: &policy::CompiledPolicy,
        d: &tollgate_core::Decision,
        kind: ResponseKind,
        credits: Option<i64>,
    ) -> HeaderMap {
        let mut h = answer();
        headers::render(p, d, kind, credits, &mut |name, value| {
            if let (Ok(n), Ok(v)) = (
                axum::http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                h.insert(n, v);
            }
        });
        h
    }

    fn pairs(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The same headers, in the same order, as `headers::render` and
    /// `from_str` give: every profile, success, rejection and other answers,
    /// with and without credits, two plans (their own quotas), kept values
    /// reused across policies that share limit numbers but not names, and
    /// values longer than the stack buffer and than `headers::render` writes
    /// (cut at a character boundary).
    #[test]
    fn rate_headers_are_those_render_gives() {
        let profiles = [
            String::new(),
            "[headers]\nprofile = \"classic\"\n".to_owned(),
            "[headers]\nprofile = \"vendor\"\nsend_on = \"success\"\non_reject = [\"reset\", \"remaining\"]\nnames = { limit = \"X-V-Limit\", remaining = \"X-V-Left\", reset = \"X-V-Reset\", credits = \"X-V-Credits\", cost = \"X-V-Cost\" }\n".to_owned(),
            "[headers]\nprofile = \"none\"\n".to_owned(),
        ];
        let limits = |names: [&str; 3]| {
            let mut s = String::new();
            for (i, name) in names.iter().enumerate() {
                s += &format!(
                    "[limits.\"{name}\"]\nalgorithm = \"sliding_window\"\nlimit = {}\nwindow = \"3s\"\n",
                    i + 2
                );
            }
            s += "[limits.lease]\nalgorithm = \"concurrency\"\nlimit = 3\nlease_ttl = \"30s\"\n";
            s += "[limits.soft]\nalgorithm = \"sliding_window\"\nlimit = 1\nwindow = \"3s\"\nmode = \"soft\"\n";
            s += "[policy]\ndefault_plan = \"basic\"\n[plans.basic]\n[plans.pro]\noverrides.burst = { limit = 50 }\n";
            s
        };
        let long = "n".repeat(300);
        let longer = "é".repeat(700);
        let mut sources: Vec<String> = Vec::new();
        for p in &profiles {
            sources.push(format!("{p}{}", limits(["burst", "q\\\"uo", "daily"])));
            sources.push(format!("{p}{}", limits(["burst", "other", "names"])));
        }
        sources.push(limits(["burst", &long, "daily"]));
        sources.push(limits(["burst", &longer, "daily"]));
        let mut compared = 0;
        for src in &sources {
            let p = match policy::parse(src, "t.toml") {
                Ok(p) => Arc::new(p),
                Err(e) => panic!("{e}\n{src}"),
            };
            let e = Engine::with_clock(
                MemoryStore::default(),
                ManualClock::new(Nanos::from_secs(86_400 * 100)),
            );
            for plan in ["basic", "pro"] {
                let r = Request {
                    account: "a",
                    ..Request::new(p.plan(plan).expect("plan"), p.default_operation())
                };
                for _ in 0..4 {
                    let d = e.decide_now(&p, &r);
                    for kind in [
                        ResponseKind::Success,
                        ResponseKind::Rejected,
                        ResponseKind::Other,
                    ] {
                        for credits in [None, Some(-7), Some(12)] {
                            let want = pairs(&expected(&p, &d, kind, credits));
                            let mut got = answer();
                            super::add(&p, &d, kind, credits, &mut got);
                            assert_eq!(pairs(&got), want, "{src}");
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 0);
    }

    /// A thread's kept `RateLimit-Policy` values hold their policy; the
    /// first value kept for another policy (a reload) lets the old one go.
    #[test]
    fn kept_values_let_a_replaced_policy_go() {
        let src = "[limits.burst]\nalgorithm = \"sliding_window\"\nlimit = 2\nwindow = \"3s\"\n";
        let old = Arc::new(policy::parse(src, "t.toml").expect("policy"));
        let new = Arc::new(policy::parse(src, "t.toml").expect("policy"));
        let e = Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(9)),
        );
        let add = |p: &Arc<policy::CompiledPolicy>| {
            let r = Request {
                account: "a",
                ..Request::new(p.default_plan, p.default_operation())
            };
            let d = e.decide_now(p, &r);
            super::add(p, &d, ResponseKind::Success, None, &mut answer());
        };
        add(&old);
        assert_eq!(
            Arc::strong_count(&old),
            2,
            "the value is kept with its policy"
        );
        add(&new);
        assert_eq!(Arc::strong_count(&old), 1, "the replaced policy is let go");
        assert_eq!(Arc::strong_count(&new), 2);
    }
}
