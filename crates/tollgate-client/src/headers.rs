//! Reading rate-limit headers: every profile tollgate emits, and the common
//! vendor spellings.
//!
//! | profile | headers read |
//! | --- | --- |
//! | IETF (draft-ietf-httpapi-ratelimit-headers-11) | `RateLimit: "name";r=R;t=T` and `RateLimit-Policy: "name";q=N;w=S, …`; the vendor parameter `tollgate-credits` |
//! | older IETF drafts | `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`; `RateLimit: limit=N, remaining=R, reset=T` |
//! | classic | `X-RateLimit-Limit`, `-Remaining`, `-Reset`, `-Cost`; `X-Credits-Remaining` |
//! | vendor | `X-<Vendor>-RateLimit-Limit`, `-Available`/`-Remaining`, `-Reset-Time`/`-Reset`; `X-<Vendor>-Credit(s)-Available`/`-Remaining` |
//! | all | `Retry-After` in seconds or as an HTTP date |
//!
//! Resets are read as seconds from now; a value above 10⁹ is taken as a Unix
//! timestamp (the GitHub convention). When a response carries several
//! `RateLimit` items, the one with the fewest remaining is described.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// What a response says about the caller's limits. Every field is optional:
/// a server sends what its profile has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitInfo {
    /// Name of the described limit (IETF profile only).
    pub name: Option<String>,
    /// Its quota (`q`, `X-RateLimit-Limit`).
    pub limit: Option<u64>,
    /// What is left of it (`r`, `X-RateLimit-Remaining`, `…-Available`).
    pub remaining: Option<u64>,
    /// Time until it resets (`t`, `X-RateLimit-Reset`, `…-Reset-Time`).
    pub reset: Option<Duration>,
    /// What this request cost (`X-RateLimit-Cost`).
    pub cost: Option<u64>,
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The credit balance (`tollgate-credits`, `X-Credits-Remaining`,
    /// `X-Picsart-Credit-Available`).
    pub credits: Option<i64>,
}

impl RateLimitInfo {
    /// Reads the headers of one response.
    pub fn parse(headers: &HeaderMap) -> RateLimitInfo {
        let mut info = RateLimitInfo::default();
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(v) = text("retry-after") {
            info.retry_after = parse_retry_after(v);
        }
        // IETF draft-11 structured fields first: they name the limit.
        let mut ietf = false;
        for v in headers.get_all("ratelimit").iter() {
            if let Ok(v) = v.to_str() {
                ietf |= info.read_ietf(v);
            }
        }
        if ietf && let Some(name) = info.name.clone() {
            for v in headers.get_all("ratelimit-policy").iter() {
                if let Ok(v) = v.to_str() {
                    for item in items(v) {
                        if item.name == name
                            && let Some(q) = item.param("q").and_then(number)
                        {
                            info.limit = Some(q);
                        }
                    }
                }
            }
        }
        // Everything else: classic, old drafts and vendor names, by suffix.
        for (name, value) in headers {
            let Ok(value) = value.to_str() else { continue };
            let name = name.as_str();
            if let Some(field) = rate_field(name) {
                match field {
                    Field::Limit => set(&mut info.limit, number(value)),
                    Field::Remaining => set(&mut info.remaining, number(value)),
                    Field::Reset => set(&mut info.reset, reset(value)),
                    Field::Cost => set(&mut info.cost, number(value)),
                }
            } else if name.contains("credit")
                && (name.ends_with("-available") || name.ends_with("-remaining"))
            {
                set(&mut info.credits, value.trim().parse().ok());
            }
        }
        info
    }

    /// How long the server asked the caller to wait: `Retry-After`, or on a
    /// 429 without it, the reset of the described limit (Picsart sends
    /// `X-Picsart-RateLimit-Reset-Time` for this).
    pub fn server_wait(&self, status: u16) -> Option<Duration> {
        self.retry_after
            .or(if status == 429 { self.reset } else { None })
    }

    fn read_ietf(&mut self, value: &str) -> bool {
        let mut found = false;
        for item in items(value) {
            // draft-07 dictionary form: `limit=100, remaining=50, reset=30`.
            if let Some((k, v)) = item.name.split_once('=') {
                match k.trim() {
                    "limit" => set(&mut self.limit, number(v)),
                    "remaining" => set(&mut self.remaining, number(v)),
                    "reset" => set(&mut self.reset, seconds(v)),
                    _ => {}
                }
                continue;
            }
            let Some(r) = item.param("r").and_then(number) else {
                continue;
            };
            if found && self.remaining.is_some_and(|cur| cur <= r) {
                continue;
            }
            found = true;
            self.name = Some(item.name.to_owned());
            self.remaining = Some(r);
            self.reset = item.param("t").and_then(seconds);
            if let Some(c) = item.param("tollgate-credits") {
                self.credits = c.parse().ok();
            }
        }
        found
    }
}

fn set<T>(slot: &mut Option<T>, v: Option<T>) {
    if slot.is_none() {
        *slot = v;
    }
}

enum Field {
    Limit,
    Remaining,
    Reset,
    Cost,
}

/// `x-ratelimit-remaining`, `x-picsart-ratelimit-available`,
/// `ratelimit-reset`… (header names are lowercase in a `HeaderMap`).
fn rate_field(name: &str) -> Option<Field> {
    let at = name.find("ratelimit-")?;
    let prefix = &name[..at];
    if !(prefix.is_empty() || prefix.starts_with("x-")) {
        return None;
    }
    match &name[at + "ratelimit-".len()..] {
        "limit" => Some(Field::Limit),
        "remaining" | "available" => Some(Field::Remaining),
        "reset" | "reset-time" | "reset-after" => Some(Field::Reset),
        "cost" => Some(Field::Cost),
        _ => None,
    }
}

/// A non-negative number, rounded up (`"12"`, `"12.5"` → 13).
fn number(v: &str) -> Option<u64> {
    let v = v.trim();
    v.parse::<u64>().ok().or_else(|| {
        let f = v.parse::<f64>().ok()?;
        (f.is_finite() && f >= 0.0).then(|| f.ceil() as u64)
    })
}

fn seconds(v: &str) -> Option<Duration> {
    let f = v.trim().parse::<f64>().ok()?;
    (f.is_finite() && f >= 0.0).then(|| Duration::from_secs_f64(f))
}

/// A reset: seconds from now, or a Unix timestamp when above 10⁹.
fn reset(v: &str) -> Option<Duration> {
    let d = seconds(v)?;
    if d.as_secs() < 1_000_000_000 {
        return Some(d);
    }
    let at = SystemTime::UNIX_EPOCH + d;
    Some(at.duration_since(wall_now()).unwrap_or(Duration::ZERO))
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(wall_now()).unwrap_or(Duration::ZERO))
}

/// The wall clock, only to turn absolute dates into delays. Waits are
/// measured with `tokio::time`, never with this.
#[allow(clippy::disallowed_methods)]
fn wall_now() -> SystemTime {
    SystemTime::now()
}

struct Item<'a> {
    name: &'a str,
    params: &'a str,
}

impl<'a> Item<'a> {
    fn param(&self, key: &str) -> Option<&'a str> {
        self.params.split(';').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        })
    }
}

/// The members of a Structured Field list: `"a";x=1, b;y=2`. Commas inside
/// strings are kept; a malformed member is skipped by the callers (no `r`).
fn items(v: &str) -> impl Iterator<Item = Item<'_>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&v[start..]);
    parts.into_iter().filter_map(|p| {
        let p = p.trim();
        if p.is_empty() {
            return None;
        }
        let (name, params) = if let Some(rest) = p.strip_prefix('"') {
            let end = rest.find('"')?;
            (&rest[..end], &rest[end + 1..])
        } else {
            match p.find(';') {
                Some(i) => (&p[..i], &p[i..]),
                None => (p, ""),
            }
        };
        Some(Item { name, params })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn ietf_structured_fields() {
        let h = map(&[
            (
                "RateLimit-Policy",
                "\"burst\";q=5;w=1, \"day\";q=1000;w=86400",
            ),
            ("RateLimit", "\"burst\";r=2;t=1;tollgate-credits=17"),
        ]);
        let i = RateLimitInfo::parse(&h);
        assert_eq!(i.name.as_deref(), Some("burst"));
        assert_eq!(i.limit, Some(5));
        assert_eq!(i.remaining, Some(2));
        assert_eq!(i.reset, Some(Duration::from_secs(1)));
        assert_eq!(i.credits, Some(17));
    }

    #[test]
    fn ietf_picks_the_item_closest_to_exhaustion() {
        let h = map(&[
            ("RateLimit-Policy", "\"a\";q=10;w=1, \"b\";q=50;w=60"),
            ("RateLimit", "\"a\";r=9;t=1, \"b\";r=3;t=40"),
        ]);
        let i = RateLimitInfo::parse(&h);
        assert_eq!(
            (i.name.as_deref(), i.limit, i.remaining),
            (Some("b"), Some(50), Some(3))
        );
        assert_eq!(i.reset, Some(Duration::from_secs(40)));
    }

    #[test]
    fn older_drafts() {
        let i = RateLimitInfo::parse(&map(&[("RateLimit", "limit=100, remaining=50, reset=30")]));
        assert_eq!(
            (i.limit, i.remaining, i.reset),
            (Some(100), Some(50), Some(Duration::from_secs(30)))
        );
        let i = RateLimitInfo::parse(&map(&[
            ("RateLimit-Limit", "10"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "7"),
        ]));
        assert_eq!(
            (i.limit, i.remaining, i.reset),
            (Some(10), Some(0), Some(Duration::from_secs(7)))
        );
    }

    #[test]
    fn classic() {
        let h = map(&[
            ("X-RateLimit-Limit", "400"),
            ("X-RateLimit-Remaining", "375"),
            ("X-RateLimit-Cost", "5"),
            ("X-RateLimit-Reset", "2"),
            ("X-Credits-Remaining", "-3"),
            ("Retry-After", "3"),
        ]);
        let i = RateLimitInfo::parse(&h);
        assert_eq!(i.limit, Some(400));
        assert_eq!(i.remaining, Some(375));
        assert_eq!(i.cost, Some(5));
        assert_eq!(i.reset, Some(Duration::from_secs(2)));
        assert_eq!(i.credits, Some(-3));
        assert_eq!(i.server_wait(429), Some(Duration::from_secs(3)));
    }

    #[test]
    fn vendor_picsart() {
        let h = map(&[
            ("X-Picsart-RateLimit-Limit", "500"),
            ("X-Picsart-RateLimit-Available", "0"),
            ("X-Picsart-RateLimit-Reset-Time", "60"),
            ("X-Picsart-Credit-Available", "20"),
        ]);
        let i = RateLimitInfo::parse(&h);
        assert_eq!(
            (i.limit, i.remaining, i.credits),
            (Some(500), Some(0), Some(20))
        );
        assert_eq!(i.reset, Some(Duration::from_secs(60)));
        // No Retry-After: a 429 waits for the reset; other answers do not.
        assert_eq!(i.server_wait(429), Some(Duration::from_secs(60)));
        assert_eq!(i.server_wait(503), None);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(wall_now() + Duration::from_secs(100));
        let d = parse_retry_after(&later).expect("date");
        assert!(
            d > Duration::from_secs(97) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn unrelated_headers_are_ignored() {
        let i = RateLimitInfo::parse(&map(&[
            ("content-length", "12"),
            ("x-ratelimit-remaining-minute", "4"),
            ("myratelimit-limit", "9"),
        ]));
        assert_eq!(i, RateLimitInfo::default());
    }
}
