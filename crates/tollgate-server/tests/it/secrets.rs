//! RELIABILITY-PLAN G3: with every log at TRACE, no API key and no admin
//! token ever reaches the logs, error bodies or metrics.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use crate::support::{Server, TOKEN};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at TRACE level.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .try_init();
        captured
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_never_reach_logs_bodies_or_metrics() {
    let logs = logs();
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "free").await;
    let mut bodies = String::new();
    // Good traffic, rejections, credit exhaustion, revocation, bad input.
    for _ in 0..8 {
        bodies.push_str(
            &s.call(false, "POST", "/v1/images", &[("x-api-key", &key)], "{}")
                .await
                .text,
        );
    }
    bodies.push_str(
        &s.call(
            false,
            "GET",
            "/v1/account",
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await
        .text,
    );
    let wrong = format!("{}X", &key[..key.len() - 1]);
    bodies.push_str(
        &s.call(false, "GET", "/x", &[("x-api-key", &wrong)], "")
            .await
            .text,
    );
    bodies.push_str(
        &s.call(
            false,
            "POST",
            "/v1/check",
            &[],
            &format!(r#"{{"key":"{key}","operation":"generate"}}"#),
        )
        .await
        .text,
    );
    bodies.push_str(
        &s.call(
            false,
            "POST",
            "/v1/check",
            &[],
            &format!(r#"{{"key":"{key}","bogus":1}}"#),
        )
        .await
        .text,
    );
    let keys = s.admin("GET", "/admin/v1/accounts/acme/keys", "").await;
    let id = keys.body[0]["id"].as_str().unwrap().to_owned();
    bodies.push_str(
        &s.admin("DELETE", &format!("/admin/v1/keys/{id}"), "")
            .await
            .text,
    );
    bodies.push_str(
        &s.admin("DELETE", &format!("/admin/v1/keys/{key}"), "")
            .await
            .text,
    );
    bodies.push_str(
        &s.call(false, "GET", "/x", &[("x-api-key", &key)], "")
            .await
            .text,
    );
    bodies.push_str(
        &s.call(
            true,
            "GET",
            "/admin/v1/events",
            &[("authorization", "Bearer wrong-token")],
            "",
        )
        .await
        .text,
    );
    bodies.push_str(&s.call(true, "GET", "/metrics", &[], "").await.text);
    s.running.shutdown().await;

    let secret = &key[15..47]; // the secret part of tg_<12-char id><32-char secret><checksum>
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(!logged.is_empty(), "logs were captured");
    for (what, text) in [("logs", &logged), ("bodies", &bodies)] {
        assert!(!text.contains(&key), "API key in {what}");
        assert!(!text.contains(secret), "key secret in {what}");
        assert!(!text.contains(&wrong), "presented wrong key in {what}");
        assert!(!text.contains(TOKEN), "admin token in {what}");
    }
}
