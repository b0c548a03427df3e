//! RELIABILITY-PLAN A12 at CI size against the real binary: policy reloads
//! under load, alternating a low and a high limit on every algorithm, with
//! invalid policies in between, by admin API and by SIGHUP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::{Opts, Tollgate, Upstream, metric};

const ALGORITHMS: [&str; 3] = ["bucket", "sliding", "calendar"];
const LOW: u32 = 5;
const HIGH: u32 = 100;

/// Hard limits of `limit` per account that do not refill within the test,
/// one per algorithm, and a roomy one for the background traffic.
fn policy(limit: u32) -> String {
    format!(
        r#"
[policy]
name = "reload-{limit}"
key_header = "x-api-key"
default_plan = "default"

[operations.bucket]
method = "POST"
path = "/bucket"

[operations.sliding]
method = "POST"
path = "/sliding"

[operations.calendar]
method = "POST"
path = "/calendar"

[operations.bg]
method = "GET"
path = "/bg"

[limits.bucket]
algorithm = "token_bucket"
capacity = {limit}
refill = 1
refill_every = "1h"
scope = ["account"]
operations = ["bucket"]

[limits.sliding]
algorithm = "sliding_window"
limit = {limit}
window = "1h"
scope = ["account"]
operations = ["sliding"]

[limits.calendar]
algorithm = "calendar_window"
limit = {limit}
window = "day"
scope = ["account"]
operations = ["calendar"]

[limits.bg]
algorithm = "token_bucket"
capacity = 100000
refill = 100000
scope = ["account"]
operations = ["bg"]

[plans.default]
"#
    )
}

const INVALID: [&str; 5] = [
    "[policy]\nname = \"broken\"\n[limits.x]\nalgorithm = \"token_bucket\"\ncapacity = -1\n",
    "[policy\nname = \"syntax\"\n",
    "[limits.x]\nalgorithm = \"no_such_algorithm\"\nlimit = 1\n",
    "[limits.x]\nalgorithm = \"sliding_window\"\nlimit = 5\nwindow = \"1h\"\nbogus = 1\n",
    "[operations.a]\nmethod = \"GET\"\npath = \"/x\"\n[operations.b]\nmethod = \"GET\"\npath = \"/x\"\n",
];

/// The status of one request per algorithm.
async fn statuses(tg: &Tollgate, key: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for a in ALGORITHMS {
        out.push(
            tg.call("x-api-key", key, "POST", &format!("/{a}"))
                .await
                .status,
        );
    }
    out
}

/// A12 (CI size: 10 valid reloads alternating limit 5 and 100 on a token
/// bucket, a sliding and a calendar window, 5 invalid ones in between; half
/// by `POST /admin/v1/reload`, half by SIGHUP; background traffic
/// throughout). Figures: failed background requests 0; invalid policy
/// adopted 0 (the limits in force stay, the error names file:line); new
/// limits effective ≤ 1 s after a valid reload (at once for the admin API);
/// stale 429s after a raise 0 (an exhausted key is admitted by the first
/// request after the raise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a12_reloads_under_load_apply_valid_policies_and_keep_out_invalid_ones() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy(LOW)).expect("policy");
    let tg = Arc::new(Tollgate::start(Opts {
        config: Some(path.clone()),
        upstream: Some(up.url()),
        ..Opts::default()
    }));
    let key = tg.account_key("reloaded", None).await;
    let bg_key = tg.account_key("background", None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let bg = {
        let (tg, stop) = (tg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut codes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                codes.push(tg.call("x-api-key", &bg_key, "GET", "/bg").await.status);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            codes
        })
    };

    // Exhaust every limit at 5.
    for _ in 0..LOW {
        assert_eq!(statuses(&tg, &key).await, [200; 3]);
    }
    assert_eq!(statuses(&tg, &key).await, [429; 3]);

    let hup = |pid: u32| {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    };
    let (mut stale, mut invalid_adopted, mut slowest) = (0, 0, Duration::ZERO);
    for round in 0..10 {
        let limit = if round % 2 == 0 { HIGH } else { LOW };
        let expected = if limit == HIGH { [200; 3] } else { [429; 3] };
        let previous = if limit == HIGH { [429; 3] } else { [200; 3] };
        let by_signal = round >= 5;
        // An invalid policy every other round: rejected, nothing changes.
        if round % 2 == 1 {
            std::fs::write(&path, INVALID[round / 2]).expect("write");
            if by_signal {
                hup(tg.pid());
                tokio::time::sleep(Duration::from_millis(300)).await;
            } else {
                let r = tg.admin("POST", "/admin/v1/reload", None).await;
                assert_eq!(r.status, 400, "{}", r.text());
                let problems = r.json()["error"]["problems"].to_string();
                assert!(
                    problems.contains("policy.toml:"),
                    "file:line:col: {problems}"
                );
            }
            if statuses(&tg, &key).await != previous {
                invalid_adopted += 1;
            }
        }
        std::fs::write(&path, policy(limit)).expect("write");
        let sent = Instant::now();
        if by_signal {
            hup(tg.pid());
            loop {
                let s = statuses(&tg, &key).await;
                if s == expected {
                    break;
                }
                assert!(
                    sent.elapsed() < Duration::from_secs(5),
                    "round {round}: limit {limit} not in force 5 s after SIGHUP: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        } else {
            let r = tg.admin("POST", "/admin/v1/reload", None).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let s = statuses(&tg, &key).await;
            if limit == HIGH {
                stale += s.iter().filter(|c| **c == 429).count();
            }
            assert_eq!(s, expected, "round {round}: limit {limit} not in force");
        }
        slowest = slowest.max(sent.elapsed());
    }

    stop.store(true, Ordering::Relaxed);
    let codes = bg.await.expect("background");
    let failed = codes.iter().filter(|c| **c != 200).count();
    let m = tg.metrics().await;
    let invalid_seen = metric(&m, "tollgate_policy_reloads_total", &["class=\"invalid\""]);
    println!(
        "A12: 10 valid + 5 invalid reloads; background {failed} failed of {}; invalid adopted \
         {invalid_adopted}; stale 429s after a raise {stale}; slowest reload to effect \
         {slowest:?}; invalid reloads counted {invalid_seen}",
        codes.len()
    );
    assert!(codes.len() > 20, "too little background traffic");
    assert_eq!(failed, 0, "background failures: {codes:?}");
    assert_eq!(invalid_adopted, 0, "an invalid policy changed the limits");
    assert_eq!(stale, 0, "stale 429s after raising the limit");
    assert!(
        slowest <= Duration::from_secs(1),
        "new limits effective {slowest:?} after a reload (goal ≤ 1 s)"
    );
    assert!(invalid_seen >= 5.0, "{m}");
}
