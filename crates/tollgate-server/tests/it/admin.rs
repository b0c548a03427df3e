//! The admin API (issue 3): Bearer token, JSON errors, accounts, keys,
//! credits, events; bad input never changes anything (RELIABILITY-PLAN G4).

use crate::support::{Server, TOKEN};

const ROUTES: [(&str, &str, &str); 10] = [
    ("POST", "/admin/v1/accounts", r#"{"id":"x"}"#),
    ("GET", "/admin/v1/accounts/x", ""),
    ("PATCH", "/admin/v1/accounts/x", r#"{"plan":"pro"}"#),
    ("POST", "/admin/v1/accounts/x/keys", ""),
    ("GET", "/admin/v1/accounts/x/keys", ""),
    ("DELETE", "/admin/v1/keys/abc", ""),
    (
        "POST",
        "/admin/v1/accounts/x/credits",
        r#"{"amount":5,"idempotency_key":"k"}"#,
    ),
    ("GET", "/admin/v1/events", ""),
    ("GET", "/admin/v1/webhooks", ""),
    ("POST", "/admin/v1/webhooks/ops/enable", ""),
];

#[tokio::test]
async fn without_a_configured_token_every_admin_route_refuses() {
    let s = Server::start(None).await;
    let unknown = s.call(true, "GET", "/admin/v1/nothing-here", &[], "").await;
    assert_eq!(
        unknown.status, 401,
        "even unknown admin paths want the token"
    );
    for (m, p, b) in ROUTES {
        let a = s
            .call(true, m, p, &[("authorization", "Bearer anything")], b)
            .await;
        assert_eq!(a.status, 401, "{m} {p}");
        assert_eq!(a.body["error"]["code"], "unauthorized");
    }
    s.running.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_token_is_401_and_changes_nothing() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "free").await;
    for (m, p, b) in ROUTES {
        for headers in [
            vec![],
            vec![("authorization", "Bearer wrong")],
            vec![("authorization", "Basic abc")],
        ] {
            let a = s.call(true, m, p, &headers, b).await;
            assert_eq!(a.status, 401, "{m} {p} {headers:?}");
        }
        // A data-plane API key is not an admin credential.
        let a = s
            .call(
                true,
                m,
                p,
                &[("authorization", &format!("Bearer {key}"))],
                b,
            )
            .await;
        assert_eq!(a.status, 401, "{m} {p} with an API key");
    }
    assert_eq!(
        s.admin("GET", "/admin/v1/accounts/x", "").await.status,
        404,
        "account x was never created"
    );
    let acme = s.admin("GET", "/admin/v1/accounts/acme", "").await;
    assert_eq!(acme.body["plan"], "free");
    assert_eq!(acme.body["credits"]["available"], 3);
    // The proxy listener exposes no admin route.
    let a = s
        .call(
            false,
            "GET",
            "/admin/v1/accounts/acme",
            &[("authorization", &format!("Bearer {TOKEN}"))],
            "",
        )
        .await;
    assert_eq!(
        a.status, 401,
        "the proxy wants an API key, not the admin token"
    );
    s.running.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let s = Server::start(Some(TOKEN)).await;
    s.account_with_key("acme", "free").await;
    let cases: [(&str, &str, &str, u16, &str); 12] = [
        ("POST", "/admin/v1/accounts", "{nope", 400, "bad_request"),
        (
            "POST",
            "/admin/v1/accounts",
            r#"{"id":"a b"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts",
            r#"{"id":"n","plan":"gold"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts",
            r#"{"id":"n","extra":1}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts",
            r#"{"id":"acme"}"#,
            409,
            "already_exists",
        ),
        (
            "POST",
            "/admin/v1/accounts/acme/credits",
            r#"{"amount":-5,"idempotency_key":"k"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts/acme/credits",
            r#"{"amount":10000000000000000,"idempotency_key":"k"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts/acme/credits",
            r#"{"amount":5}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/admin/v1/accounts/ghost/credits",
            r#"{"amount":5,"idempotency_key":"k"}"#,
            404,
            "not_found",
        ),
        (
            "PATCH",
            "/admin/v1/accounts/acme",
            r#"{"overrides":{"nope":{"limit":5}}}"#,
            400,
            "bad_request",
        ),
        (
            "PATCH",
            "/admin/v1/accounts/acme",
            r#"{"overrides":{"burst":{"limit":5}}}"#,
            400,
            "bad_request",
        ),
        ("DELETE", "/admin/v1/keys/ghost", "", 404, "not_found"),
    ];
    for (m, p, b, status, code) in cases {
        let a = s.admin(m, p, b).await;
        assert_eq!(a.status, status, "{m} {p} {b}: {}", a.text);
        assert_eq!(a.body["error"]["code"], code, "{m} {p} {b}: {}", a.text);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let acme = s.admin("GET", "/admin/v1/accounts/acme", "").await;
    assert_eq!(
        acme.body["credits"]["available"], 3,
        "no bad call changed the balance"
    );
    assert_eq!(acme.body["overrides"], serde_json::json!({}));
    s.running.shutdown().await;
}

#[tokio::test]
async fn accounts_keys_credits_and_events() {
    let s = Server::start(Some(TOKEN)).await;
    let a = s
        .admin(
            "POST",
            "/admin/v1/accounts",
            r#"{"id":"acme","org":"bigcorp","created_at":"2026-01-02T03:04:05Z"}"#,
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.body["org"], "bigcorp");
    assert_eq!(a.body["plan"], "free");
    let k = s
        .admin(
            "POST",
            "/admin/v1/accounts/acme/keys",
            r#"{"app":"mobile"}"#,
        )
        .await;
    assert_eq!(k.status, 201);
    let key = k.body["key"].as_str().unwrap().to_owned();
    let prefix = k.body["prefix"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&prefix));
    let list = s.admin("GET", "/admin/v1/accounts/acme/keys", "").await;
    assert_eq!(list.body[0]["prefix"], prefix.as_str());
    assert_eq!(list.body[0]["app"], "mobile");
    assert!(
        !list.text.contains(&key),
        "listing never shows the key itself"
    );

    // The key works on the proxy, then is revoked.
    let ok = s
        .call(false, "GET", "/hello", &[("x-api-key", &key)], "")
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["account"], "acme");
    let del = s
        .admin(
            "DELETE",
            &format!("/admin/v1/keys/{}", k.body["id"].as_str().unwrap()),
            "",
        )
        .await;
    assert_eq!(del.status, 200);
    // Revocation reaches this replica at once (and others within the cache bound).
    let gone = s
        .call(false, "GET", "/hello", &[("x-api-key", &key)], "")
        .await;
    assert_eq!(gone.status, 403, "{}", gone.text);
    assert_eq!(gone.body["error"]["code"], "revoked_key");

    // Credits: idempotent purchases.
    for _ in 0..3 {
        let c = s
            .admin(
                "POST",
                "/admin/v1/accounts/acme/credits",
                r#"{"amount":10,"reason":"purchase","idempotency_key":"order-1"}"#,
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        assert_eq!(c.body["balance"], 13, "one order, charged once");
    }
    // Plan change and overrides.
    let p = s
        .admin(
            "PATCH",
            "/admin/v1/accounts/acme",
            r#"{"plan":"pro","overrides":{"burst":{"capacity":7}}}"#,
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.body["plan"], "pro");
    let g = s.admin("GET", "/admin/v1/accounts/acme", "").await;
    let burst = g.body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "burst")
        .cloned()
        .unwrap();
    assert_eq!(
        burst["limit"], 7,
        "the account override wins over the plan: {}",
        g.text
    );

    let ev = s.admin("GET", "/admin/v1/events?account=acme", "").await;
    let kinds: Vec<&str> = ev
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"key_created") && kinds.contains(&"key_revoked"),
        "{kinds:?}"
    );
    assert!(!ev.text.contains(&key));
    s.running.shutdown().await;
}

#[tokio::test]
async fn metrics_and_health_carry_no_secrets() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme-secret-account", "free").await;
    for _ in 0..8 {
        s.call(false, "GET", "/x", &[("x-api-key", &key)], "").await;
    }
    let m = s.call(true, "GET", "/metrics", &[], "").await;
    assert_eq!(m.status, 200);
    assert!(m.text.contains("tollgate_decisions_total"), "{}", m.text);
    assert!(m.text.contains("outcome=\"rejected\""));
    assert!(
        !m.text.contains(&key)
            && !m.text.contains("acme-secret-account")
            && !m.text.contains("127.0.0.1")
    );
    assert_eq!(s.call(false, "GET", "/healthz", &[], "").await.status, 200);
    assert_eq!(s.call(false, "GET", "/readyz", &[], "").await.status, 200);
    s.running.shutdown().await;
}

/// Webhook endpoints: listed by origin only (a URL's path and query may hold
/// a secret), disabled after a 410, enabled again by the admin.
#[tokio::test]
async fn webhook_endpoints_are_listed_and_enabled_again() {
    use tollgate_server::webhooks::{Endpoint, WebhookSecret, WebhookSettings};
    let s = Server::configured(
        Some(TOKEN),
        tollgate_server::config::DEFAULT_POLICY,
        None,
        |c| {
            c.webhooks = WebhookSettings {
                endpoints: vec![Endpoint {
                    id: "ops".into(),
                    url: "http://127.0.0.1:9/hook?token=s3cret".parse().expect("url"),
                    secrets: vec![WebhookSecret::generate().expect("secret").0],
                    events: Some(vec!["credits_low".into()]),
                }],
                allow_private_targets: true,
                ..WebhookSettings::default()
            };
        },
    )
    .await;
    let listed = s.admin("GET", "/admin/v1/webhooks", "").await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert!(!listed.text.contains("s3cret"), "{}", listed.text);
    assert_eq!(listed.body["endpoints"][0]["id"], "ops");
    assert_eq!(listed.body["endpoints"][0]["origin"], "http://127.0.0.1:9");
    assert_eq!(listed.body["endpoints"][0]["events"][0], "credits_low");
    assert_eq!(listed.body["endpoints"][0]["disabled"], false);
    assert_eq!(listed.body["outbox"]["failed"], 0);

    s.running
        .state
        .ledger
        .disable_endpoint("ops", 410)
        .await
        .expect("disable");
    let listed = s.admin("GET", "/admin/v1/webhooks", "").await;
    assert_eq!(listed.body["endpoints"][0]["disabled"], true);
    let enabled = s.admin("POST", "/admin/v1/webhooks/ops/enable", "").await;
    assert_eq!(enabled.status, 200, "{}", enabled.text);
    assert_eq!(enabled.body["was_disabled"], true);
    let listed = s.admin("GET", "/admin/v1/webhooks", "").await;
    assert_eq!(listed.body["endpoints"][0]["disabled"], false);
    let again = s.admin("POST", "/admin/v1/webhooks/ops/enable", "").await;
    assert_eq!(again.body["was_disabled"], false);
    let unknown = s.admin("POST", "/admin/v1/webhooks/nope/enable", "").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["error"]["code"], "not_found");
    s.running.shutdown().await;
}

/// G4: the admin listener binds 127.0.0.1 by default; no debug, profiling
/// or config-dump endpoint answers on either listener (with the admin
/// token on the admin listener, with an API key on the proxy listener,
/// where such paths are forwarded to the upstream, never served by
/// tollgate); `/metrics` is served by the admin listener only.
#[tokio::test]
async fn g4_admin_binds_loopback_and_no_debug_endpoint_exists() {
    let defaults = tollgate_server::config::ServerConfig::default();
    assert!(
        defaults.admin_listen.ip().is_loopback(),
        "default admin bind {}",
        defaults.admin_listen
    );
    // No upstream: the built-in echo answers forwarded paths with a JSON
    // echo of the request (never tollgate data).
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "pro").await;
    let probes = [
        "/debug/pprof/",
        "/debug/pprof/heap",
        "/debug/vars",
        "/debug",
        "/pprof",
        "/admin/v1/debug",
        "/admin/v1/config",
        "/admin/v1/policy/dump",
        "/config",
        "/env",
        "/actuator",
        "/server-status",
        "/tokio-console",
    ];
    let mut served = Vec::new();
    for p in probes {
        let a = s.admin("GET", p, "").await;
        if a.status == 200 {
            served.push(format!("admin {p}: {}", a.text));
        }
    }
    // The proxy listener: the data plane's own answers are /healthz,
    // /readyz and /v1/*; /metrics must not be among them.
    let m = s.call(false, "GET", "/metrics", &[], "").await;
    let m_keyed = s
        .call(false, "GET", "/metrics", &[("x-api-key", &key)], "")
        .await;
    println!(
        "G4: {} debug probes on the admin listener, {} answered 200; proxy /metrics without a \
         key {}, with a key {} (forwarded: {})",
        probes.len(),
        served.len(),
        m.status,
        m_keyed.status,
        !m_keyed.text.contains("tollgate_")
    );
    assert!(
        served.is_empty(),
        "debug endpoints served:\n{}",
        served.join("\n")
    );
    assert_ne!(m.status, 200, "/metrics on the proxy listener: {}", m.text);
    assert!(
        !m_keyed.text.contains("tollgate_decisions_total"),
        "the proxy listener served metrics"
    );
    assert_eq!(s.admin("GET", "/metrics", "").await.status, 200);
    s.running.shutdown().await;
}
