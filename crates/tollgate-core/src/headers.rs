//! Rate-limit response headers for each header profile.
//!
//! - `ietf`: `RateLimit-Policy` and `RateLimit` as Structured Field lists per
//!   draft-ietf-httpapi-ratelimit-headers-11: every enforced limit that applied
//!   is advertised in `RateLimit-Policy` (`"name";q=N;w=S`, with
//!   `qu="concurrent-requests"` on concurrency limits), and `RateLimit` gives
//!   `"name";r=R;t=T` for the described limit; credits ride along as the
//!   vendor parameter `tollgate-credits` on the `RateLimit` item.
//! - `classic`: `X-RateLimit-Limit`, `-Remaining`, `-Reset` (seconds), `-Cost`,
//!   and `X-Credits-Remaining`.
//! - `vendor`: the names the policy gives each field.
//!
//! The *described* limit is the one that rejected on a rejection (a client
//! told about another limit would retry too early), otherwise the enforced
//! limit closest to exhaustion. `Retry-After` is on every rejection, in whole
//! seconds rounded up, never 0 when the caller must wait. Values are written
//! with `itoa` into a stack buffer; nothing here allocates.

use crate::clock::ceil_secs;
use crate::decision::{Decision, LimitResult, Outcome};
use crate::policy::{CompiledPolicy, HeaderField, HeaderKind, LimitId, Mode, SendOn};

/// The response a set of headers is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// A 2xx answer (from the upstream or tollgate).
    Success,
    /// A rejection by a rate limit (429 or the limit's own status).
    Rejected,
    /// Any other answer (upstream error, 402, payload errors…).
    Other,
}

/// `Retry-After`.
pub const RETRY_AFTER: &str = "Retry-After";
/// IETF draft policy field.
pub const RATELIMIT_POLICY: &str = "RateLimit-Policy";
/// IETF draft state field.
pub const RATELIMIT: &str = "RateLimit";

const CLASSIC: [(HeaderField, &str); 5] = [
    (HeaderField::Limit, "X-RateLimit-Limit"),
    (HeaderField::Remaining, "X-RateLimit-Remaining"),
    (HeaderField::Reset, "X-RateLimit-Reset"),
    (HeaderField::Cost, "X-RateLimit-Cost"),
    (HeaderField::Credits, "X-Credits-Remaining"),
];

/// Longest header value [`render`] writes: a longer one is cut to this many
/// bytes (to the last whole character).
pub const VALUE_MAX: usize = 1024;

/// A header value built on the stack.
#[derive(Clone)]
pub struct ValueBuf {
    buf: [u8; VALUE_MAX],
    len: usize,
}

impl Default for ValueBuf {
    fn default() -> Self {
        ValueBuf {
            buf: [0; VALUE_MAX],
            len: 0,
        }
    }
}

impl ValueBuf {
    fn clear(&mut self) {
        self.len = 0;
    }

    fn push(&mut self, s: &str) {
        let end = (self.len + s.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&s.as_bytes()[..n]);
        self.len = end;
    }

    fn num(&mut self, v: u64) {
        let mut b = itoa::Buffer::new();
        let s = b.format(v);
        self.push(s);
    }

    fn signed(&mut self, v: i64) {
        let mut b = itoa::Buffer::new();
        let s = b.format(v);
        self.push(s);
    }

    /// The value written so far.
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are pushed; truncation at capacity may cut a
        // multi-byte character, in which case the valid prefix is returned.
        match std::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

/// Where [`render_to`] writes headers: a value in pieces (`text`, `num`,
/// `signed`), then `end(name)` names the header it belongs to. A value
/// starts at the start or right after the previous `end`; nothing written
/// is ever left without an `end`.
pub trait HeaderSink {
    /// Appends `s` to the value being written.
    fn text(&mut self, s: &str);
    /// Appends `v` in decimal.
    fn num(&mut self, v: u64) {
        self.text(itoa::Buffer::new().format(v));
    }
    /// Appends `v` in decimal, with its sign.
    fn signed(&mut self, v: i64) {
        self.text(itoa::Buffer::new().format(v));
    }
    /// Appends limit `limit`'s `name` in double quotes (how the `RateLimit`
    /// value names the limit it describes). The default writes the three
    /// pieces with [`HeaderSink::text`]; a sink that keeps the names in the
    /// form it writes them may write that instead.
    fn quoted_limit_name(&mut self, limit: LimitId, name: &str) {
        let _ = limit;
        self.text("\"");
        self.text(name);
        self.text("\"");
    }
    /// The value written since the previous `end` is header `name`'s.
    fn end(&mut self, name: &str);
    /// Writes the whole `RateLimit-Policy` value of `decision` (its
    /// enforced results, at least one) when the sink keeps it from an
    /// earlier decision, and says so; `false` (the default) has
    /// [`render_to`] write it piece by piece. A kept value must be the one
    /// those pieces make: the results' limit names, quotas, lease flags and
    /// windows.
    fn policy_value(&mut self, decision: &Decision) -> bool {
        let _ = decision;
        false
    }
}

/// [`render`]'s sink: each value in a [`ValueBuf`], handed to `emit`.
struct Emitter<'e, F> {
    v: ValueBuf,
    emit: &'e mut F,
}

impl<F: FnMut(&str, &str)> HeaderSink for Emitter<'_, F> {
    fn text(&mut self, s: &str) {
        self.v.push(s);
    }

    fn num(&mut self, v: u64) {
        self.v.num(v);
    }

    fn signed(&mut self, v: i64) {
        self.v.signed(v);
    }

    fn end(&mut self, name: &str) {
        (self.emit)(name, self.v.as_str());
        self.v.clear();
    }
}

/// Writes the headers for `decision` answered as `kind` through `emit(name, value)`.
/// `credits` is the caller's balance, when known.
pub fn render(
    policy: &CompiledPolicy,
    decision: &Decision,
    kind: ResponseKind,
    credits: Option<i64>,
    emit: &mut impl FnMut(&str, &str),
) {
    let mut sink = Emitter {
        v: ValueBuf::default(),
        emit,
    };
    render_to(policy, decision, kind, credits, &mut sink);
}

/// [`render`] into any [`HeaderSink`]: the same headers, in the same order,
/// each value in the pieces it is made of (a sink may, say, escape them as
/// it goes). [`render`] cuts a value at 1,024 bytes ([`ValueBuf`]); a sink
/// that must match it does the same.
pub fn render_to(
    policy: &CompiledPolicy,
    decision: &Decision,
    kind: ResponseKind,
    credits: Option<i64>,
    v: &mut impl HeaderSink,
) {
    let rejected = kind == ResponseKind::Rejected;
    if rejected && let Outcome::Rejected { .. } = decision.outcome {
        v.num(ceil_secs(decision.retry_after()).max(1));
        v.end(RETRY_AFTER);
    }
    let profile = &policy.headers;
    let wanted = |f: HeaderField| {
        let all = profile.send_on == SendOn::All || kind == ResponseKind::Success;
        if all {
            profile.fields.contains(&f)
        } else {
            rejected && profile.on_reject.contains(&f)
        }
    };
    let described = decision.described();
    match profile.kind {
        HeaderKind::None => {}
        HeaderKind::Ietf => {
            if wanted(HeaderField::Limit) && v.policy_value(decision) {
                v.end(RATELIMIT_POLICY);
            } else if wanted(HeaderField::Limit) {
                let mut first = true;
                for r in decision
                    .results()
                    .iter()
                    .filter(|r| r.mode == Mode::Enforce)
                {
                    if !first {
                        v.text(", ");
                    }
                    first = false;
                    policy_item(v, policy, r);
                }
                if !first {
                    v.end(RATELIMIT_POLICY);
                }
            }
            if let Some(r) = described
                && (wanted(HeaderField::Remaining) || wanted(HeaderField::Reset))
            {
                v.quoted_limit_name(r.limit, &policy.limits[usize::from(r.limit)].name);
                if wanted(HeaderField::Remaining) {
                    v.text(";r=");
                    v.num(r.eval.remaining);
                }
                if wanted(HeaderField::Reset) {
                    v.text(";t=");
                    v.num(reset_secs(r, decision));
                }
                if let (true, Some(c)) = (wanted(HeaderField::Credits), credits) {
                    v.text(";tollgate-credits=");
                    v.signed(c);
                }
                v.end(RATELIMIT);
            }
        }
        HeaderKind::Classic | HeaderKind::Vendor => {
            let fields = [
                HeaderField::Limit,
                HeaderField::Remaining,
                HeaderField::Reset,
                HeaderField::Cost,
                HeaderField::Credits,
            ];
            for f in fields {
                if !wanted(f) {
                    continue;
                }
                let name = if profile.kind == HeaderKind::Classic {
                    CLASSIC.iter().find(|(g, _)| *g == f).map(|(_, n)| *n)
                } else {
                    profile
                        .names
                        .iter()
                        .find(|(g, _)| *g == f)
                        .map(|(_, n)| n.as_str())
                };
                let Some(name) = name else { continue };
                match (f, described) {
                    (HeaderField::Credits, _) => match credits {
                        Some(c) => v.signed(c),
                        None => continue,
                    },
                    (_, None) => continue,
                    (HeaderField::Limit, Some(r)) => v.num(r.quota),
                    (HeaderField::Remaining, Some(r)) => v.num(r.eval.remaining),
                    (HeaderField::Reset, Some(r)) => v.num(reset_secs(r, decision)),
                    (HeaderField::Cost, Some(r)) => v.num(r.cost),
                }
                v.end(name);
            }
        }
    }
}

/// Seconds until the described limit resets; on a rejection, until the
/// request could pass (never 0 then).
fn reset_secs(r: &LimitResult, d: &Decision) -> u64 {
    if let Outcome::Rejected { limit } = d.outcome
        && limit == r.limit
    {
        return ceil_secs(r.eval.retry_after).max(1);
    }
    ceil_secs(r.eval.reset)
}

fn policy_item(v: &mut impl HeaderSink, policy: &CompiledPolicy, r: &LimitResult) {
    v.text("\"");
    v.text(&policy.limits[usize::from(r.limit)].name);
    v.text("\";q=");
    v.num(r.quota);
    if r.is_lease {
        v.text(";qu=\"concurrent-requests\"");
    } else {
        v.text(";w=");
        v.num(r.window_secs);
    }
}

/// Body of a rejection as `application/problem+json` (RFC 9457) with the
/// draft's `quota-exceeded` problem type and `violated-policies`.
pub fn problem_details(policy: &CompiledPolicy, decision: &Decision) -> String {
    let name = decision
        .described()
        .map_or("", |r| policy.limits[usize::from(r.limit)].name.as_str());
    let retry = ceil_secs(decision.retry_after()).max(1);
    let mut out = String::with_capacity(256);
    out.push_str("{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\"title\":\"Request cannot be satisfied as assigned quota has been exceeded\",\"status\":429,\"violated-policies\":[");
    json_string(&mut out, name);
    out.push_str("],\"retry_after_s\":");
    out.push_str(itoa::Buffer::new().format(retry));
    out.push('}');
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Engine, ManualClock, MemoryStore, Nanos, Request, policy};

    fn collect(
        policy: &CompiledPolicy,
        d: &Decision,
        kind: ResponseKind,
        credits: Option<i64>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        render(policy, d, kind, credits, &mut |n, v| {
            out.push((n.to_owned(), v.to_owned()))
        });
        out
    }

    const TWO_LIMITS: &str = r#"
        [limits.burst]
        algorithm = "sliding_window"
        limit = 2
        window = "3s"
        [limits.daily]
        algorithm = "calendar_window"
        limit = 100
        window = "day"
        [limits.watch]
        algorithm = "sliding_window"
        limit = 1
        window = "3s"
        mode = "soft"
    "#;

    #[test]
    fn ietf_fields_describe_the_closest_then_the_rejecting_limit() {
        let p = policy::parse(TWO_LIMITS, "t.toml").unwrap();
        let e = Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(86_400 * 100)),
        );
        let r = Request {
            account: "a",
            ..Request::new(p.default_plan, p.default_operation())
        };
        let d = e.decide_now(&p, &r);
        let h = collect(&p, &d, ResponseKind::Success, Some(7));
        assert_eq!(
            h[0],
            (
                "RateLimit-Policy".into(),
                "\"burst\";q=2;w=3, \"daily\";q=100;w=86400".into()
            )
        );
        assert_eq!(h[1], ("RateLimit".into(), "\"burst\";r=1;t=3".into()));
        e.decide_now(&p, &r);
        let d = e.decide_now(&p, &r);
        assert!(matches!(d.outcome, Outcome::Rejected { .. }));
        let h = collect(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(h[0], ("Retry-After".into(), "3".into()));
        assert_eq!(h[2], ("RateLimit".into(), "\"burst\";r=0;t=3".into()));
        let body = problem_details(&p, &d);
        assert!(body.contains("\"violated-policies\":[\"burst\"]"), "{body}");
    }

    #[test]
    fn vendor_profile_success_only_with_reset_on_reject() {
        let src = r#"
            [headers]
            profile = "vendor"
            send_on = "success"
            on_reject = ["reset"]
            names = { limit = "X-V-Limit", remaining = "X-V-Available", reset = "X-V-Reset", credits = "X-V-Credits" }
            [limits.m]
            algorithm = "calendar_window"
            limit = 1
            window = "minute"
        "#;
        let p = policy::parse(src, "t.toml").unwrap();
        let e = Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(600)),
        );
        let r = Request {
            account: "a",
            ..Request::new(p.default_plan, p.default_operation())
        };
        let d = e.decide_now(&p, &r);
        let names: Vec<String> = collect(&p, &d, ResponseKind::Success, Some(20))
            .into_iter()
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        assert_eq!(
            names,
            [
                "X-V-Limit: 1",
                "X-V-Available: 0",
                "X-V-Reset: 60",
                "X-V-Credits: 20"
            ]
        );
        assert!(collect(&p, &d, ResponseKind::Other, Some(20)).is_empty());
        let d = e.decide_now(&p, &r);
        let names: Vec<String> = collect(&p, &d, ResponseKind::Rejected, Some(20))
            .into_iter()
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        assert_eq!(names, ["Retry-After: 60", "X-V-Reset: 60"]);
    }
}
