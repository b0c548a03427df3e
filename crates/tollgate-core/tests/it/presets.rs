//! Conformance of the reference presets in `examples/policies/`: each group
//! replays its requirement document's numbers (seeds/*.txt) on a virtual
//! clock and checks outcomes, Retry-After, headers and remaining counts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_core::headers::{ResponseKind, render};
use tollgate_core::policy::{self, CompiledPolicy, LimitId};
use tollgate_core::{Clock, Decision, Engine, ManualClock, MemoryStore, Nanos, Outcome};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

fn load(file: &str) -> CompiledPolicy {
    let path = policies_dir().join(file);
    policy::load(&path).unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()))
}

/// An instant given in RFC 3339.
fn at(s: &str) -> Nanos {
    let ts: jiff::Timestamp = s.parse().expect("RFC 3339 instant");
    Nanos(u64::try_from(ts.as_nanosecond()).expect("after 1970"))
}

fn engine(start: Nanos) -> Engine<MemoryStore, ManualClock> {
    Engine::with_clock(MemoryStore::default(), ManualClock::new(start))
}

fn limit(p: &CompiledPolicy, name: &str) -> LimitId {
    p.limit(name)
        .unwrap_or_else(|| panic!("limit `{name}` missing"))
}

fn op(p: &CompiledPolicy, method: &str, path: &str) -> u16 {
    p.operation_for(method, path)
        .unwrap_or_else(|| panic!("{method} {path} matches nothing"))
}

fn op_name<'p>(p: &'p CompiledPolicy, method: &str, path: &str) -> &'p str {
    &p.operations[usize::from(op(p, method, path))].name
}

/// Headers rendered for `d` answered as `kind`, in order.
fn headers(
    p: &CompiledPolicy,
    d: &Decision,
    kind: ResponseKind,
    credits: Option<i64>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    render(p, d, kind, credits, &mut |n: &str, v: &str| {
        out.push((n.to_owned(), v.to_owned()))
    });
    out
}

fn header<'h>(h: &'h [(String, String)], name: &str) -> Option<&'h str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn rejected_by(d: &Decision) -> Option<LimitId> {
    match d.outcome {
        Outcome::Rejected { limit } => Some(limit),
        _ => None,
    }
}

fn crossed(p: &CompiledPolicy, d: &Decision) -> Vec<String> {
    d.crossings()
        .map(|r| p.limits[usize::from(r.limit)].name.clone())
        .collect()
}

fn remaining(d: &Decision, l: LimitId) -> u64 {
    d.result(l)
        .unwrap_or_else(|| panic!("limit {l} did not apply"))
        .eval
        .remaining
}

#[test]
fn every_preset_in_examples_loads() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(policies_dir()).expect("examples/policies exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            policy::load(&path)
                .unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()));
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for expected in [
        "enhance-api.toml",
        "photoroom-api.toml",
        "photoshop-api.toml",
        "picsart-creative-api.toml",
        "weighted-bucket-api.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from examples/policies: {names:?}"
        );
    }
}

/// seeds/000_b3e7ec0e44983a00.txt — Photoshop API.
mod photoshop {
    use super::*;
    use std::collections::BTreeMap;
    use tollgate_core::Request;
    use tollgate_core::policy::{AccountOverrides, HeaderKind, OverrideValues};

    const FILE: &str = "photoshop-api.toml";
    /// 2026-01-01T00:00:00Z: on a day boundary.
    fn t0() -> Nanos {
        at("2026-01-01T00:00:00Z")
    }
    const POST_GENERAL: (&str, &str) = ("POST", "/pie/psdService/photoshopActions");

    fn req<'a>(
        p: &CompiledPolicy,
        method: &str,
        path: &str,
        org: &'a str,
        account: &'a str,
    ) -> Request<'a> {
        Request {
            org,
            account,
            key: account,
            ..Request::new(p.default_plan, op(p, method, path))
        }
    }

    #[test]
    fn routes_plans_and_keys() {
        let p = load(FILE);
        assert_eq!(p.key_header, "x-api-key");
        assert_eq!(
            p.plans
                .iter()
                .map(|pl| pl.name.as_str())
                .collect::<Vec<_>>(),
            ["default"]
        );
        assert_eq!(op_name(&p, "POST", "/sensei/cutout"), "remove-background");
        assert_eq!(
            op_name(&p, "GET", "/sensei/status/abc-123"),
            "remove-background-status"
        );
        assert_eq!(op_name(&p, "POST", "/sensei/mask"), "masking");
        assert_eq!(
            op_name(&p, "POST", "/pie/psdService/renditionCreate"),
            "general-post"
        );
        assert_eq!(
            op_name(&p, "GET", "/pie/psdService/status/abc-123"),
            "general-get"
        );
        assert_eq!(p.headers.kind, HeaderKind::Ietf);
        // "The service will retry status codes of 429, 502, 503, 504 three times."
        assert_eq!(p.upstream.retries, 3);
        assert_eq!(p.upstream.retry_on, [429, 502, 503, 504]);
        // "Usage limits apply to your entire organization."
        for l in &p.limits {
            assert_eq!(
                l.scope,
                [policy::ScopePart::Org],
                "limit {} is org-wide",
                l.name
            );
        }
    }

    #[test]
    fn sixteenth_post_in_3s_passes_with_soft_crossing_and_seventeenth_is_429() {
        let p = load(FILE);
        let e = engine(t0());
        let r = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1");
        for i in 1..=15 {
            let d = e.decide_now(&p, &r);
            assert_eq!(d.outcome, Outcome::Admitted, "request {i}");
            assert!(
                crossed(&p, &d).is_empty(),
                "request {i} crosses nothing: {:?}",
                crossed(&p, &d)
            );
        }
        // 16th: hard 16/3 s admits it; soft 15/3 s is crossed (reported, not refused).
        let d = e.decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(crossed(&p, &d), ["general-post-3s-soft"]);
        assert_eq!(remaining(&d, limit(&p, "general-post-3s")), 0);
        // 17th: hard limit refuses with 429 + Retry-After.
        let d = e.decide_now(&p, &r);
        assert_eq!(rejected_by(&d), Some(limit(&p, "general-post-3s")));
        assert!(
            d.retry_after() >= Duration::from_secs(1),
            "{:?}",
            d.retry_after()
        );
        // The 16 taken at t0 come back exactly 3 s later (Retry-After ≤ the window).
        assert_eq!(d.retry_after(), Duration::from_secs(3));
        let h = headers(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(header(&h, "Retry-After"), Some("3"));
        // The headers describe the limit that rejected.
        assert_eq!(header(&h, "RateLimit"), Some("\"general-post-3s\";r=0;t=3"));
        let policy_h = header(&h, "RateLimit-Policy").expect("RateLimit-Policy");
        assert!(
            policy_h.contains("\"general-post-3s\";q=16;w=3"),
            "{policy_h}"
        );
        assert!(
            policy_h.contains("\"general-post-minute\";q=320;w=60"),
            "{policy_h}"
        );
        assert!(
            !policy_h.contains("soft"),
            "soft limits are not advertised: {policy_h}"
        );

        // Retry-After is exact: refused 1 ns before, admitted at it.
        e.clock().advance(d.retry_after() - Duration::from_nanos(1));
        assert!(rejected_by(&e.decide_now(&p, &r)).is_some());
        e.clock().advance(Duration::from_nanos(1));
        assert_eq!(e.decide_now(&p, &r).outcome, Outcome::Admitted);
    }

    #[test]
    fn rejected_requests_consume_nothing_from_the_minute_limit() {
        let p = load(FILE);
        let e = engine(t0());
        let r = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1");
        let minute = limit(&p, "general-post-minute");
        let minute_soft = limit(&p, "general-post-minute-soft");
        for _ in 0..16 {
            assert!(e.decide_now(&p, &r).is_allowed());
        }
        for _ in 0..50 {
            assert!(rejected_by(&e.decide_now(&p, &r)).is_some());
        }
        e.clock().advance(Duration::from_secs(3));
        let d = e.decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::Admitted);
        // 17 admitted in the minute; the 50 rejections took nothing.
        assert_eq!(remaining(&d, minute), 320 - 17);
        assert_eq!(remaining(&d, minute_soft), 300 - 17);
    }

    #[test]
    fn post_320_per_minute_holds_across_3s_windows() {
        let p = load(FILE);
        let e = engine(t0());
        let r = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1");
        let minute = limit(&p, "general-post-minute");
        let three = limit(&p, "general-post-3s");
        // 20 bursts of 16, one per 3 s window (3 s apart): the minute counter
        // keeps counting across the 3 s windows and reaches exactly 320.
        let mut admitted = 0;
        let mut soft_minute_crossed_at = None;
        for burst in 0..20 {
            for _ in 0..16 {
                let d = e.decide_now(&p, &r);
                assert_eq!(d.outcome, Outcome::Admitted, "burst {burst}");
                admitted += 1;
                assert_eq!(remaining(&d, minute), 320 - admitted, "burst {burst}");
                if soft_minute_crossed_at.is_none()
                    && crossed(&p, &d)
                        .iter()
                        .any(|n| n == "general-post-minute-soft")
                {
                    soft_minute_crossed_at = Some(admitted);
                }
            }
            if burst < 19 {
                e.clock().advance(Duration::from_secs(3));
            }
        }
        assert_eq!(admitted, 320);
        // The soft 300/min limit was crossed before that: reported, never refused.
        assert!(
            soft_minute_crossed_at.is_some_and(|n| n > 280),
            "{soft_minute_crossed_at:?}"
        );
        // The 321st is over the minute limit as well as the 3 s one.
        let d = e.decide_now(&p, &r);
        assert!(rejected_by(&d).is_some());
        assert!(
            d.result(minute).unwrap().exceeded(),
            "the minute limit refuses on its own"
        );
        assert!(d.result(three).unwrap().exceeded());

        // With the 3 s limit lifted for one org (account override), the minute
        // limit alone stops the 321st request in one burst.
        let lifted = AccountOverrides::parse(
            &p,
            &BTreeMap::from([(
                "general-post-3s".to_owned(),
                OverrideValues {
                    limit: Some(10_000),
                    ..Default::default()
                },
            )]),
        )
        .expect("valid override");
        let e = engine(t0());
        let r = Request {
            overrides: Some(&lifted),
            ..req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-b", "acct-b")
        };
        for i in 0..320 {
            assert!(e.decide_now(&p, &r).is_allowed(), "request {i}");
        }
        let d = e.decide_now(&p, &r);
        assert_eq!(rejected_by(&d), Some(minute));
        // All 320 were taken at t0: they come back exactly a minute later.
        assert_eq!(d.retry_after(), Duration::from_secs(60));
        let h = headers(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(header(&h, "Retry-After"), Some("60"));
        assert_eq!(
            header(&h, "RateLimit"),
            Some("\"general-post-minute\";r=0;t=60")
        );
    }

    #[test]
    fn org_scope_is_shared_by_every_account_of_the_org() {
        let p = load(FILE);
        let e = engine(t0());
        let a1 = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1");
        let a2 = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-2");
        let other = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-b", "acct-3");
        for _ in 0..8 {
            assert!(e.decide_now(&p, &a1).is_allowed());
            assert!(e.decide_now(&p, &a2).is_allowed());
        }
        assert_eq!(
            rejected_by(&e.decide_now(&p, &a1)),
            Some(limit(&p, "general-post-3s"))
        );
        assert_eq!(
            rejected_by(&e.decide_now(&p, &a2)),
            Some(limit(&p, "general-post-3s"))
        );
        assert_eq!(
            e.decide_now(&p, &other).outcome,
            Outcome::Admitted,
            "another org has its own counters"
        );
    }

    #[test]
    fn get_310_hard_300_soft_per_3s() {
        let p = load(FILE);
        let e = engine(t0());
        let r = req(&p, "GET", "/pie/psdService/status/job-1", "org-a", "acct-1");
        for i in 1..=310 {
            let d = e.decide_now(&p, &r);
            assert_eq!(d.outcome, Outcome::Admitted, "GET {i}");
            assert_eq!(
                !crossed(&p, &d).is_empty(),
                i > 300,
                "GET {i}: {:?}",
                crossed(&p, &d)
            );
        }
        assert_eq!(
            rejected_by(&e.decide_now(&p, &r)),
            Some(limit(&p, "general-get-3s"))
        );
        // GETs do not count against the POST limits.
        let post = req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1");
        let d = e.decide_now(&p, &post);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(remaining(&d, limit(&p, "general-post-3s")), 15);
    }

    #[test]
    fn remove_background_post_6_hard_2_soft_get_1000_hard_500_soft() {
        let p = load(FILE);
        let e = engine(t0());
        let cut = req(&p, "POST", "/sensei/cutout", "org-a", "acct-1");
        for i in 1..=6 {
            let d = e.decide_now(&p, &cut);
            assert_eq!(d.outcome, Outcome::Admitted, "cutout {i}");
            let c = crossed(&p, &d);
            if i <= 2 {
                assert!(c.is_empty(), "cutout {i}: {c:?}");
            } else {
                assert_eq!(c, ["remove-background-post-3s-soft"], "cutout {i}");
            }
        }
        let d = e.decide_now(&p, &cut);
        assert_eq!(
            rejected_by(&d),
            Some(limit(&p, "remove-background-post-3s"))
        );
        assert_eq!(
            header(
                &headers(&p, &d, ResponseKind::Rejected, None),
                "Retry-After"
            ),
            Some("3"),
            "the 6 taken at t0 come back exactly 3 s later"
        );
        // The service limits are separate from the general ones.
        let d = e.decide_now(
            &p,
            &req(&p, POST_GENERAL.0, POST_GENERAL.1, "org-a", "acct-1"),
        );
        assert_eq!(remaining(&d, limit(&p, "general-post-3s")), 15);

        let status = req(&p, "GET", "/sensei/status/job-9", "org-a", "acct-1");
        for i in 1..=1000 {
            let d = e.decide_now(&p, &status);
            assert_eq!(d.outcome, Outcome::Admitted, "status {i}");
            assert_eq!(!crossed(&p, &d).is_empty(), i > 500, "status {i}");
        }
        assert_eq!(
            rejected_by(&e.decide_now(&p, &status)),
            Some(limit(&p, "remove-background-get-3s"))
        );
    }

    #[test]
    fn masking_60_per_minute_and_9000_per_day() {
        let p = load(FILE);
        let e = engine(t0());
        let r = req(&p, "POST", "/sensei/mask", "org-a", "acct-1");
        let day = limit(&p, "masking-day");
        let minute = limit(&p, "masking-minute");
        for _ in 0..60 {
            assert_eq!(e.decide_now(&p, &r).outcome, Outcome::Admitted);
        }
        let d = e.decide_now(&p, &r);
        assert_eq!(rejected_by(&d), Some(minute));
        assert_eq!(d.retry_after(), Duration::from_secs(60));
        // 150 minute windows of 60 = 9000 in the day, then the day limit refuses.
        for w in 1..150 {
            e.clock().advance(Duration::from_secs(60));
            for i in 0..60 {
                let d = e.decide_now(&p, &r);
                assert_eq!(d.outcome, Outcome::Admitted, "window {w} request {i}");
            }
        }
        e.clock().advance(Duration::from_secs(60));
        let d = e.decide_now(&p, &r);
        assert_eq!(rejected_by(&d), Some(day));
        assert_eq!(remaining(&d, day), 0);
        let next_day = at("2026-01-02T00:00:00Z");
        assert_eq!(d.retry_after(), next_day.since(e.clock().now()));
        // The day resets at midnight UTC.
        e.clock().set(Nanos(next_day.0 - 1));
        assert_eq!(rejected_by(&e.decide_now(&p, &r)), Some(day));
        e.clock().set(next_day);
        let d = e.decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(remaining(&d, day), 8999);
    }
}

/// seeds/001_84f93ec0235b4e8c.txt — Picsart Creative APIs.
mod picsart {
    use super::*;
    use tollgate_core::Request;
    use tollgate_core::policy::{HeaderKind, Respond, SendOn};

    const FILE: &str = "picsart-creative-api.toml";

    fn tools<'a>(p: &CompiledPolicy, plan: &str, account: &'a str, app: &'a str) -> Request<'a> {
        let plan = p.plan(plan).expect("plan");
        Request {
            account,
            org: account,
            app,
            key: app,
            ..Request::new(plan, op(p, "POST", "/tools/1.0/removebg"))
        }
    }

    #[test]
    fn routes_plans_credits_and_keys() {
        let p = load(FILE);
        assert_eq!(p.key_header, "x-picsart-api-key");
        let names: Vec<&str> = p.plans.iter().map(|pl| pl.name.as_str()).collect();
        for n in ["free", "credits", "subscription"] {
            assert!(names.contains(&n), "plan {n}: {names:?}");
        }
        assert_eq!(p.plans[usize::from(p.default_plan)].name, "free");
        // "up to 200 credits during the demo run" — only the free plan grants credits.
        assert_eq!(p.plans[usize::from(p.plan("free").unwrap())].grant, 200);
        assert_eq!(p.plans[usize::from(p.plan("credits").unwrap())].grant, 0);
        assert_eq!(
            p.plans[usize::from(p.plan("subscription").unwrap())].grant,
            0
        );
        // "the API will return a 402 status code with { "message": "Payment Required" }"
        assert_eq!(p.credits.exhausted_status, 402);
        assert_eq!(
            p.credits.exhausted_body.as_deref(),
            Some(r#"{"message":"Payment Required"}"#)
        );
        let t = &p.operations[usize::from(op(&p, "POST", "/tools/1.0/upscale"))];
        assert_eq!((t.name.as_str(), t.credits), ("tools", 1));
        let b = &p.operations[usize::from(op(&p, "GET", "/tools/1.0/balance"))];
        assert_eq!(
            (b.name.as_str(), b.credits, b.respond),
            ("balance", 0, Some(Respond::Balance))
        );
        assert_eq!(p.headers.kind, HeaderKind::Vendor);
        assert_eq!(p.headers.send_on, SendOn::Success);
        assert_eq!(
            p.limits[usize::from(limit(&p, "requests-per-minute"))].scope,
            [policy::ScopePart::Account]
        );
    }

    #[test]
    fn five_hundred_per_minute_then_429_with_reset_time_only() {
        let p = load(FILE);
        let e = engine(at("2026-01-01T10:00:15Z"));
        for plan in ["free", "credits", "subscription"] {
            let account = format!("acct-{plan}");
            let r = tools(&p, plan, &account, "app-1");
            for i in 1..=500u64 {
                let d = e.decide_now(&p, &r);
                assert_eq!(d.outcome, Outcome::Admitted, "{plan} request {i}");
                // 200 OK: limit, available, reset time and credit balance.
                let h = headers(&p, &d, ResponseKind::Success, Some(20));
                assert_eq!(header(&h, "X-Picsart-RateLimit-Limit"), Some("500"));
                assert_eq!(
                    header(&h, "X-Picsart-RateLimit-Available"),
                    Some((500 - i).to_string().as_str())
                );
                assert_eq!(header(&h, "X-Picsart-RateLimit-Reset-Time"), Some("45"));
                assert_eq!(header(&h, "X-Picsart-Credit-Available"), Some("20"));
                assert_eq!(header(&h, "Retry-After"), None);
                // Any other answer (402, upstream error): none of them.
                assert!(headers(&p, &d, ResponseKind::Other, Some(20)).is_empty());
            }
            let d = e.decide_now(&p, &r);
            assert_eq!(
                rejected_by(&d),
                Some(limit(&p, "requests-per-minute")),
                "{plan}"
            );
            assert_eq!(d.retry_after(), Duration::from_secs(45));
            let h = headers(&p, &d, ResponseKind::Rejected, Some(20));
            assert_eq!(header(&h, "X-Picsart-RateLimit-Reset-Time"), Some("45"));
            assert_eq!(header(&h, "Retry-After"), Some("45"));
            assert_eq!(header(&h, "X-Picsart-RateLimit-Limit"), None);
            assert_eq!(header(&h, "X-Picsart-RateLimit-Available"), None);
            assert_eq!(header(&h, "X-Picsart-Credit-Available"), None);
            assert_eq!(h.len(), 2, "{h:?}");
        }
        // The counter resets on the minute.
        let r = tools(&p, "free", "acct-free", "app-1");
        e.clock().set(Nanos(at("2026-01-01T10:01:00Z").0 - 1));
        assert!(rejected_by(&e.decide_now(&p, &r)).is_some());
        e.clock().set(at("2026-01-01T10:01:00Z"));
        let d = e.decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::Admitted);
        let h = headers(&p, &d, ResponseKind::Success, None);
        assert_eq!(header(&h, "X-Picsart-RateLimit-Available"), Some("499"));
        assert_eq!(header(&h, "X-Picsart-RateLimit-Reset-Time"), Some("60"));
        assert_eq!(
            header(&h, "X-Picsart-Credit-Available"),
            None,
            "no balance given, no header"
        );
    }

    #[test]
    fn balance_endpoint_is_free_and_answers_even_when_rate_limited() {
        let p = load(FILE);
        let e = engine(at("2026-01-01T10:00:00Z"));
        let r = tools(&p, "free", "acct-1", "app-1");
        for _ in 0..500 {
            assert!(e.decide_now(&p, &r).is_allowed());
        }
        assert!(rejected_by(&e.decide_now(&p, &r)).is_some());
        let bal = Request {
            operation: op(&p, "GET", "/tools/1.0/balance"),
            ..r
        };
        let d = e.decide_now(&p, &bal);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(
            d.result(limit(&p, "requests-per-minute")).map(|r| r.cost),
            Some(0)
        );
    }

    #[test]
    fn account_scope_by_default_app_scope_switchable() {
        let p = load(FILE);
        let e = engine(at("2026-01-01T10:00:00Z"));
        // Two apps of one account share the account's 500.
        for i in 0..500 {
            let app = if i % 2 == 0 { "app-1" } else { "app-2" };
            assert!(
                e.decide_now(&p, &tools(&p, "subscription", "acct-1", app))
                    .is_allowed()
            );
        }
        assert!(
            rejected_by(&e.decide_now(&p, &tools(&p, "subscription", "acct-1", "app-2"))).is_some()
        );

        // The switch the preset documents: scope = ["app"] gives each app its own 500.
        let src = std::fs::read_to_string(policies_dir().join(FILE)).unwrap();
        assert_eq!(src.matches("\nscope = [\"account\"]").count(), 1);
        let app_scoped = policy::parse(
            &src.replace("\nscope = [\"account\"]", "\nscope = [\"app\"]"),
            FILE,
        )
        .expect("valid");
        let e = engine(at("2026-01-01T10:00:00Z"));
        for _ in 0..500 {
            assert!(
                e.decide_now(
                    &app_scoped,
                    &tools(&app_scoped, "subscription", "acct-1", "app-1")
                )
                .is_allowed()
            );
        }
        assert!(
            rejected_by(&e.decide_now(
                &app_scoped,
                &tools(&app_scoped, "subscription", "acct-1", "app-1")
            ))
            .is_some()
        );
        assert!(
            e.decide_now(
                &app_scoped,
                &tools(&app_scoped, "subscription", "acct-1", "app-2")
            )
            .is_allowed()
        );
    }
}

/// seeds/002_bfcc2d7e2fcb881f.txt — Photoroom API.
mod photoroom {
    use super::*;
    use std::collections::BTreeMap;
    use tollgate_core::Request;
    use tollgate_core::policy::{AccountOverrides, ImageFormat, OverrideValues, Respond};

    const FILE: &str = "photoroom-api.toml";

    fn segment<'a>(p: &CompiledPolicy, plan: &str, account: &'a str) -> Request<'a> {
        Request {
            account,
            org: account,
            ..Request::new(p.plan(plan).expect("plan"), op(p, "POST", "/v1/segment"))
        }
    }

    /// Sends images until refused; returns how many passed and the refusal.
    fn fill(
        e: &Engine<MemoryStore, ManualClock>,
        p: &CompiledPolicy,
        r: &Request<'_>,
    ) -> (u64, Decision) {
        let mut n = 0;
        loop {
            let d = e.decide_now(p, r);
            if !d.is_allowed() {
                return (n, d);
            }
            n += 1;
            assert!(n <= 10_000, "never refused");
        }
    }

    #[test]
    fn routes_plans_payload_rules_and_credits() {
        let p = load(FILE);
        assert_eq!(p.key_header, "x-api-key");
        assert_eq!(p.plans[usize::from(p.default_plan)].name, "basic");
        assert!(p.plan("enterprise").is_some());
        let rb = &p.operations[usize::from(op(&p, "POST", "/v1/segment"))];
        assert_eq!((rb.name.as_str(), rb.credits), ("remove-background", 1));
        let rules = rb.payload.as_ref().expect("payload rules");
        assert_eq!(rules.max_body, Some(50_000_000));
        assert_eq!(rules.max_pixels, Some(6000));
        assert!(!rules.forward_oversize);
        assert_eq!(
            rules.formats,
            [
                ImageFormat::Png,
                ImageFormat::Jpeg,
                ImageFormat::Webp,
                ImageFormat::Heic
            ]
        );
        let ed = &p.operations[usize::from(op(&p, "POST", "/v2/edit"))];
        assert_eq!((ed.name.as_str(), ed.credits), ("editing", 1));
        let rules = ed.payload.as_ref().expect("payload rules");
        assert_eq!(rules.max_body, Some(30_000_000));
        assert_eq!(rules.max_pixels, Some(5000));
        assert!(
            rules.forward_oversize,
            "larger resolutions are resized by the upstream"
        );
        assert_eq!(
            rules.formats,
            [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp]
        );
        let acct = &p.operations[usize::from(op(&p, "GET", "/v2/account"))];
        assert_eq!((acct.credits, acct.respond), (0, Some(Respond::Balance)));
    }

    #[test]
    fn basic_60_per_minute_enterprise_600() {
        let p = load(FILE);
        let images = limit(&p, "images-per-minute");
        let e = engine(at("2026-01-01T00:00:00Z"));
        let (n, d) = fill(&e, &p, &segment(&p, "basic", "acct-basic"));
        assert_eq!(n, 60);
        assert_eq!(rejected_by(&d), Some(images));
        let h = headers(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(header(&h, "Retry-After"), Some("60"));
        assert_eq!(
            header(&h, "RateLimit"),
            Some("\"images-per-minute\";r=0;t=60")
        );
        // Editing counts against the same 60 images.
        let edit = Request {
            operation: op(&p, "POST", "/v2/edit"),
            ..segment(&p, "basic", "acct-basic")
        };
        assert_eq!(rejected_by(&e.decide_now(&p, &edit)), Some(images));
        // The balance endpoint does not count.
        let balance = Request {
            operation: op(&p, "GET", "/v2/account"),
            ..segment(&p, "basic", "acct-basic")
        };
        assert!(e.decide_now(&p, &balance).is_allowed());

        let (n, d) = fill(&e, &p, &segment(&p, "enterprise", "acct-ent"));
        assert_eq!(n, 600);
        assert_eq!(rejected_by(&d), Some(images));
        assert_eq!(d.result(images).unwrap().quota, 600);
    }

    #[test]
    fn editing_and_remove_background_share_the_budget() {
        let p = load(FILE);
        let e = engine(at("2026-01-01T00:00:00Z"));
        let seg = segment(&p, "basic", "acct-1");
        let edit = Request {
            operation: op(&p, "POST", "/v2/edit"),
            ..seg
        };
        for i in 0..60 {
            let d = e.decide_now(&p, if i % 2 == 0 { &seg } else { &edit });
            assert_eq!(d.outcome, Outcome::Admitted);
            assert_eq!(remaining(&d, limit(&p, "images-per-minute")), 59 - i);
        }
        assert!(rejected_by(&e.decide_now(&p, &seg)).is_some());
    }

    #[test]
    fn per_account_override_replaces_the_plan_number() {
        let p = load(FILE);
        let custom = AccountOverrides::parse(
            &p,
            &BTreeMap::from([(
                "images-per-minute".to_owned(),
                OverrideValues {
                    limit: Some(120),
                    ..Default::default()
                },
            )]),
        )
        .expect("valid override");
        let e = engine(at("2026-01-01T00:00:00Z"));
        let r = Request {
            overrides: Some(&custom),
            ..segment(&p, "basic", "acct-custom")
        };
        let (n, d) = fill(&e, &p, &r);
        assert_eq!(n, 120);
        assert_eq!(d.result(limit(&p, "images-per-minute")).unwrap().quota, 120);
        // Another basic account keeps 60.
        let (n, _) = fill(&e, &p, &segment(&p, "basic", "acct-plain"));
        assert_eq!(n, 60);
        // A bad override is refused in plain words.
        let bad = AccountOverrides::parse(
            &p,
            &BTreeMap::from([(
                "images-per-minute".to_owned(),
                OverrideValues {
                    capacity: Some(5),
                    ..Default::default()
                },
            )]),
        );
        assert!(bad.is_err());
    }
}

/// seeds/003_c60825ccfc028e8a.txt — image enhancement API.
mod enhance {
    use super::*;
    use tollgate_core::Request;
    use tollgate_core::policy::{Action, Mode};

    const FILE: &str = "enhance-api.toml";
    const ROLLOUT: &str = "2026-06-01T00:00:00Z";

    fn new_account() -> Option<Nanos> {
        Some(at("2026-07-01T00:00:00Z"))
    }

    fn register<'a>(
        p: &CompiledPolicy,
        plan: &str,
        account: &'a str,
        ip: &'a str,
        attrs: &'a [Option<&'a str>],
    ) -> Request<'a> {
        Request {
            account,
            org: account,
            ip,
            attributes: attrs,
            account_created_at: new_account(),
            ..Request::new(p.plan(plan).expect("plan"), op(p, "POST", "/v3/images/"))
        }
    }

    #[test]
    fn routes_plans_attributes_and_marker() {
        let p = load(FILE);
        assert_eq!(p.key_header, "x-api-key");
        for n in ["trial", "standard", "enterprise"] {
            assert!(p.plan(n).is_some(), "plan {n}");
        }
        assert_eq!(op_name(&p, "POST", "/v3/images/"), "register-image");
        assert_eq!(op_name(&p, "POST", "/v3/images"), "register-image");
        assert_eq!(op_name(&p, "POST", "/v3/brackets/"), "register-bracket");
        let fname = usize::from(p.attribute("file_name").expect("file_name attribute"));
        let src =
            |m, path| p.operations[usize::from(op(&p, m, path))].attribute_sources[fname].clone();
        assert_eq!(
            src("POST", "/v3/images/"),
            Some(policy::AttributeSource::Json("image_name".into()))
        );
        assert_eq!(
            src("POST", "/v3/brackets/"),
            Some(policy::AttributeSource::Json("name".into()))
        );
        let day = &p.limits[usize::from(limit(&p, "enhancements-per-day"))];
        assert_eq!(
            day.on_exceed,
            Action::Forward {
                header: "Tollgate-Limit-Exceeded".into()
            }
        );
        for l in &p.limits {
            assert_eq!(
                l.rollout_after,
                Some(at(ROLLOUT)),
                "limit {} rolls out to new accounts first",
                l.name
            );
        }
    }

    #[test]
    fn three_hundred_requests_per_second_per_ip() {
        let p = load(FILE);
        let e = engine(at("2026-08-01T12:00:00Z"));
        let any = op(&p, "GET", "/v3/images/abc");
        let from = |ip| Request {
            ip,
            account: "acct-1",
            org: "acct-1",
            account_created_at: new_account(),
            ..Request::new(p.default_plan, any)
        };
        for i in 0..300 {
            assert_eq!(
                e.decide_now(&p, &from("203.0.113.7")).outcome,
                Outcome::Admitted,
                "request {i}"
            );
        }
        let d = e.decide_now(&p, &from("203.0.113.7"));
        assert_eq!(rejected_by(&d), Some(limit(&p, "requests-per-ip")));
        let h = headers(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(
            header(&h, "Retry-After"),
            Some("1"),
            "a 1 s window frees exactly 1 s after use"
        );
        // Another IP is not affected.
        assert!(e.decide_now(&p, &from("198.51.100.1")).is_allowed());
        // "The limit resolves as soon as traffic slows."
        e.clock().advance(d.retry_after());
        assert!(e.decide_now(&p, &from("203.0.113.7")).is_allowed());
    }

    #[test]
    fn file_name_window_resets_exactly_on_the_hour() {
        let p = load(FILE);
        let fname = limit(&p, "file-name-per-hour");
        let e = engine(at("2026-08-01T10:59:00Z"));
        let same = [Some("IMG_0001.jpg")];
        let r = register(&p, "standard", "acct-1", "203.0.113.7", &same);
        let bracket = Request {
            operation: op(&p, "POST", "/v3/brackets/"),
            ..r
        };
        // Images and brackets count against the same file name.
        for i in 0..30 {
            let d = e.decide_now(&p, if i < 20 { &r } else { &bracket });
            assert_eq!(d.outcome, Outcome::Admitted, "registration {i}");
            assert_eq!(remaining(&d, fname), 29 - i);
        }
        let d = e.decide_now(&p, &r);
        assert_eq!(rejected_by(&d), Some(fname));
        assert_eq!(d.retry_after(), Duration::from_secs(60));
        let h = headers(&p, &d, ResponseKind::Rejected, None);
        assert_eq!(header(&h, "Retry-After"), Some("60"));
        assert_eq!(
            header(&h, "RateLimit"),
            Some("\"file-name-per-hour\";r=0;t=60")
        );
        assert_eq!(rejected_by(&e.decide_now(&p, &bracket)), Some(fname));
        // Another file name passes.
        let other = [Some("IMG_0002.jpg")];
        assert!(
            e.decide_now(
                &p,
                &register(&p, "standard", "acct-1", "203.0.113.7", &other)
            )
            .is_allowed()
        );
        // Rejected 1 ns before the hour, admitted on it.
        e.clock().set(Nanos(at("2026-08-01T11:00:00Z").0 - 1));
        assert_eq!(rejected_by(&e.decide_now(&p, &r)), Some(fname));
        e.clock().set(at("2026-08-01T11:00:00Z"));
        let d = e.decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(remaining(&d, fname), 29);
    }

    #[test]
    fn the_501st_enhancement_is_forwarded_with_a_marker_and_resets_at_midnight() {
        let p = load(FILE);
        let day = limit(&p, "enhancements-per-day");
        let e = engine(at("2026-08-01T09:00:00Z"));
        let names: Vec<String> = (0..=520).map(|i| format!("img-{i:04}.jpg")).collect();
        let attrs: Vec<[Option<&str>; 1]> = names.iter().map(|n| [Some(n.as_str())]).collect();
        for (i, a) in attrs.iter().enumerate().take(500) {
            let d = e.decide_now(&p, &register(&p, "standard", "acct-1", "203.0.113.7", a));
            assert_eq!(d.outcome, Outcome::Admitted, "enhancement {}", i + 1);
            assert_eq!(remaining(&d, day), 499 - i as u64);
            e.clock().advance(Duration::from_millis(5));
        }
        let d = e.decide_now(
            &p,
            &register(&p, "standard", "acct-1", "203.0.113.7", &attrs[500]),
        );
        // Accepted (no 429) but marked, so the job ends in an error state with a status_reason.
        assert_eq!(d.outcome, Outcome::Forwarded { limit: day });
        assert!(d.is_allowed());
        assert_eq!(p.limits[usize::from(day)].name, "enhancements-per-day");
        let Action::Forward { header: marker } = &p.limits[usize::from(day)].on_exceed else {
            panic!("forward action")
        };
        assert_eq!(marker, "Tollgate-Limit-Exceeded");
        let h = headers(&p, &d, ResponseKind::Success, None);
        assert_eq!(header(&h, "Retry-After"), None);
        // Brackets are not enhancements.
        let bracket = Request {
            operation: op(&p, "POST", "/v3/brackets/"),
            ..register(&p, "standard", "acct-1", "203.0.113.7", &attrs[501])
        };
        assert_eq!(e.decide_now(&p, &bracket).outcome, Outcome::Admitted);
        // Another account has its own 500.
        assert_eq!(
            e.decide_now(
                &p,
                &register(&p, "standard", "acct-2", "203.0.113.8", &attrs[502])
            )
            .outcome,
            Outcome::Admitted
        );
        // "The limit resets daily": midnight UTC.
        e.clock().set(Nanos(at("2026-08-02T00:00:00Z").0 - 1));
        assert_eq!(
            e.decide_now(
                &p,
                &register(&p, "standard", "acct-1", "203.0.113.7", &attrs[503])
            )
            .outcome,
            Outcome::Forwarded { limit: day }
        );
        e.clock().set(at("2026-08-02T00:00:00Z"));
        let d = e.decide_now(
            &p,
            &register(&p, "standard", "acct-1", "203.0.113.7", &attrs[504]),
        );
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(remaining(&d, day), 499);
    }

    #[test]
    fn plan_tiers_set_the_daily_enhancements() {
        let p = load(FILE);
        let day = limit(&p, "enhancements-per-day");
        let e = engine(at("2026-08-01T09:00:00Z"));
        let f = [Some("a.jpg")];
        for (plan, quota) in [("trial", 50), ("standard", 500), ("enterprise", 5000)] {
            let d = e.decide_now(&p, &register(&p, plan, plan, "203.0.113.7", &f));
            assert_eq!(d.result(day).unwrap().quota, quota, "plan {plan}");
        }
        // The trial's 51st is forwarded with the marker.
        let e = engine(at("2026-08-01T09:00:00Z"));
        let names: Vec<String> = (0..51).map(|i| format!("t-{i}.jpg")).collect();
        for (i, n) in names.iter().enumerate() {
            let a = [Some(n.as_str())];
            let d = e.decide_now(&p, &register(&p, "trial", "acct-t", "203.0.113.7", &a));
            let expected = if i < 50 {
                Outcome::Admitted
            } else {
                Outcome::Forwarded { limit: day }
            };
            assert_eq!(d.outcome, expected, "trial enhancement {}", i + 1);
        }
    }

    #[test]
    fn rollout_older_accounts_run_the_limits_in_shadow() {
        let p = load(FILE);
        let fname = limit(&p, "file-name-per-hour");
        let day = limit(&p, "enhancements-per-day");
        let e = engine(at("2026-08-01T10:00:00Z"));
        let same = [Some("IMG_0001.jpg")];
        let old = Request {
            account_created_at: Some(at("2026-01-15T00:00:00Z")),
            ..register(&p, "trial", "acct-old", "203.0.113.7", &same)
        };
        let new = Request {
            account_created_at: Some(at(ROLLOUT)),
            ..register(&p, "trial", "acct-new", "198.51.100.1", &same)
        };
        for _ in 0..30 {
            assert_eq!(e.decide_now(&p, &old).outcome, Outcome::Admitted);
            assert_eq!(e.decide_now(&p, &new).outcome, Outcome::Admitted);
        }
        // Created before rollout_after: evaluated in shadow, never refused.
        for _ in 0..10 {
            let d = e.decide_now(&p, &old);
            assert_eq!(d.outcome, Outcome::Admitted);
            assert_eq!(d.result(fname).unwrap().mode, Mode::Shadow);
            assert!(crossed(&p, &d).contains(&"file-name-per-hour".to_owned()));
        }
        // Created at rollout_after: enforced.
        let d = e.decide_now(&p, &new);
        assert_eq!(rejected_by(&d), Some(fname));
        assert_eq!(d.result(fname).unwrap().mode, Mode::Enforce);

        // The forward action too: an old trial account past 50/day is neither
        // refused nor marked.
        let e = engine(at("2026-08-01T10:00:00Z"));
        let names: Vec<String> = (0..60).map(|i| format!("o-{i}.jpg")).collect();
        for (i, n) in names.iter().enumerate() {
            let a = [Some(n.as_str())];
            let d = e.decide_now(
                &p,
                &Request {
                    attributes: &a,
                    ..old
                },
            );
            assert_eq!(
                d.outcome,
                Outcome::Admitted,
                "old account enhancement {}",
                i + 1
            );
            assert_eq!(d.result(day).unwrap().mode, Mode::Shadow);
            assert_eq!(d.result(day).unwrap().exceeded(), i >= 50);
        }
    }
}

/// seeds/004_66e5759ee16d80e6.txt — weighted token bucket (photo-library API).
mod weighted_bucket {
    use super::*;
    use tollgate_core::Request;

    const FILE: &str = "weighted-bucket-api.toml";

    fn req<'a>(p: &CompiledPolicy, method: &str, path: &str, account: &'a str) -> Request<'a> {
        Request {
            account,
            org: account,
            ..Request::new(p.default_plan, op(p, method, path))
        }
    }

    /// `X-RateLimit-Limit`, `-Remaining`, `-Cost` and every header sent.
    type Classic = (
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<(String, String)>,
    );

    fn classic(p: &CompiledPolicy, d: &Decision, kind: ResponseKind) -> Classic {
        let h = headers(p, d, kind, None);
        let get = |n| header(&h, n).map(str::to_owned);
        (
            get("X-RateLimit-Limit"),
            get("X-RateLimit-Remaining"),
            get("X-RateLimit-Cost"),
            h,
        )
    }

    #[test]
    fn routes_and_costs() {
        let p = load(FILE);
        assert_eq!(p.key_header, "x-api-key");
        assert_eq!(
            p.plans
                .iter()
                .map(|pl| pl.name.as_str())
                .collect::<Vec<_>>(),
            ["default"]
        );
        let bucket = limit(&p, "token-bucket");
        for (method, path, cost) in [
            ("GET", "/api/assets/42", 1),
            ("POST", "/api/albums", 1),
            ("PUT", "/api/people/7", 1),
            ("GET", "/api/assets", 5),
            ("GET", "/api/search", 5),
            ("GET", "/api/assets/42/thumbnail", 10),
            ("POST", "/api/assets", 20),
            ("GET", "/api/assets/42/original", 20),
        ] {
            let applied = p.applicable(p.default_plan, op(&p, method, path));
            assert_eq!(applied.len(), 1, "{method} {path}");
            assert_eq!(
                (applied[0].limit, applied[0].cost),
                (bucket, cost),
                "{method} {path}"
            );
        }
        assert_eq!(op_name(&p, "POST", "/api/assets"), "upload");
        assert_eq!(op_name(&p, "GET", "/api/assets/42/original"), "download");
    }

    #[test]
    fn twenty_uploads_then_429_after_200ms_with_headers_on_every_response() {
        let p = load(FILE);
        let e = engine(at("2026-01-01T00:00:00Z"));
        let up = req(&p, "POST", "/api/assets", "user-1");
        for i in 1..=20u64 {
            let d = e.decide_now(&p, &up);
            assert_eq!(d.outcome, Outcome::Admitted, "upload {i}");
            let (l, r, c, h) = classic(&p, &d, ResponseKind::Success);
            assert_eq!(l.as_deref(), Some("400"));
            assert_eq!(r, Some((400 - 20 * i).to_string()));
            assert_eq!(c.as_deref(), Some("20"));
            assert_eq!(h.len(), 3, "only limit, remaining, cost: {h:?}");
            // "included in every response": also on other answers.
            assert_eq!(headers(&p, &d, ResponseKind::Other, None).len(), 3);
        }
        let d = e.decide_now(&p, &up);
        assert_eq!(rejected_by(&d), Some(limit(&p, "token-bucket")));
        // 20 tokens at 100/s: exactly 200 ms.
        assert_eq!(d.retry_after(), Duration::from_millis(200));
        let (l, r, c, h) = classic(&p, &d, ResponseKind::Rejected);
        assert_eq!(header(&h, "Retry-After"), Some("1"));
        assert_eq!(
            (l.as_deref(), r.as_deref(), c.as_deref()),
            (Some("400"), Some("0"), Some("20"))
        );
        assert_eq!(h.len(), 4, "{h:?}");
        // Exact: refused 1 ns before, admitted at 200 ms.
        e.clock()
            .advance(Duration::from_millis(200) - Duration::from_nanos(1));
        assert!(rejected_by(&e.decide_now(&p, &up)).is_some());
        e.clock().advance(Duration::from_nanos(1));
        let d = e.decide_now(&p, &up);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(
            classic(&p, &d, ResponseKind::Success).1.as_deref(),
            Some("0")
        );
    }

    #[test]
    fn mixed_costs_consume_exactly_and_refill_at_100_per_second() {
        let p = load(FILE);
        let bucket = limit(&p, "token-bucket");
        let e = engine(at("2026-01-01T00:00:00Z"));
        let metadata = req(&p, "GET", "/api/assets/42", "user-1");
        let list = req(&p, "GET", "/api/assets", "user-1");
        let thumb = req(&p, "GET", "/api/assets/42/thumbnail", "user-1");
        let download = req(&p, "GET", "/api/assets/42/original", "user-1");
        let mut left = 400;
        for (r, cost) in [
            (&metadata, 1),
            (&list, 5),
            (&thumb, 10),
            (&download, 20),
            (&metadata, 1),
            (&list, 5),
        ] {
            let d = e.decide_now(&p, r);
            left -= cost;
            assert_eq!(remaining(&d, bucket), left);
            assert_eq!(
                classic(&p, &d, ResponseKind::Success).2,
                Some(cost.to_string())
            );
        }
        assert_eq!(left, 358);
        // Drain to 15 tokens, then an upload (20) must wait 50 ms while a list passes.
        for _ in 0..343 {
            assert!(e.decide_now(&p, &metadata).is_allowed());
        }
        let d = e.decide_now(&p, &req(&p, "POST", "/api/assets", "user-1"));
        assert_eq!(rejected_by(&d), Some(bucket));
        assert_eq!(d.retry_after(), Duration::from_millis(50));
        assert_eq!(remaining(&d, bucket), 15);
        assert_eq!(
            header(
                &headers(&p, &d, ResponseKind::Rejected, None),
                "Retry-After"
            ),
            Some("1")
        );
        let d = e.decide_now(&p, &list);
        assert_eq!(remaining(&d, bucket), 10);
        // Refill: 100 ms gives back 10 tokens.
        e.clock().advance(Duration::from_millis(100));
        let d = e.decide_now(&p, &metadata);
        assert_eq!(remaining(&d, bucket), 19);
        // A full refill takes 4 s.
        e.clock().advance(Duration::from_secs(4));
        assert_eq!(remaining(&e.decide_now(&p, &thumb), bucket), 390);
        // Users have separate buckets.
        assert_eq!(
            remaining(
                &e.decide_now(&p, &req(&p, "POST", "/api/assets", "user-2")),
                bucket
            ),
            380
        );
    }
}
