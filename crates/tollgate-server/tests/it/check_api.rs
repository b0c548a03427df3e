//! `POST /v1/check` is served before the router (borrowed parse, axum's
//! extractor as the fallback): its answers must be the router's.

use crate::support::{Server, TOKEN};

async fn post(s: &Server, content_type: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let (status, bytes) = s.post_raw("/v1/check", content_type, body.to_owned()).await;
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, body)
}

fn message(v: &serde_json::Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn check_answers_match_the_router_for_every_body_shape() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "pro").await;
    let json = Some("application/json");

    // Plain strings (borrowed), escaped strings (owned fallback) and another
    // JSON content type (axum's extractor) decide the same way.
    let (st, plain) = post(&s, json, r#"{"account":"acme","cost":0}"#).await;
    assert_eq!(st, 200, "{plain}");
    let (st, escaped) = post(&s, json, r#"{"account":"ac\u006de","cost":0}"#).await;
    assert_eq!(st, 200, "{escaped}");
    let (st, charset) = post(
        &s,
        Some("application/json; charset=utf-8"),
        r#"{"account":"acme","cost":0}"#,
    )
    .await;
    assert_eq!(st, 200, "{charset}");
    for answer in [&escaped, &charset] {
        for field in ["allowed", "status", "operation", "reason", "retry_after_s"] {
            assert_eq!(answer[field], plain[field], "{field}");
        }
        assert_eq!(
            answer["headers"]
                .as_object()
                .map(|h| h.keys().collect::<Vec<_>>()),
            plain["headers"]
                .as_object()
                .map(|h| h.keys().collect::<Vec<_>>())
        );
        assert_eq!(answer["limits"].as_array().map(Vec::len), Some(2));
    }
    let (st, by_key) = post(&s, json, &format!(r#"{{"key":"{key}","cost":0}}"#)).await;
    assert_eq!((st, &by_key["allowed"]), (200, &serde_json::json!(true)));

    // Errors carry axum's messages, as before.
    let (st, e) = post(&s, Some("text/plain"), r#"{"account":"acme"}"#).await;
    assert_eq!(st, 400);
    assert_eq!(
        message(&e),
        "invalid check request: Expected request with `Content-Type: application/json`"
    );
    let (st, e) = post(&s, json, r#"{"account":"acme","bogus":1}"#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).starts_with(
            "invalid check request: Failed to deserialize the JSON body into the target type: "
        ) && message(&e).contains("unknown field `bogus`"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":"acme","#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).starts_with("invalid check request: Failed to parse the request body as JSON"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":1}"#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).contains("invalid type: integer `1`, expected a string"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":"nobody"}"#).await;
    assert_eq!((st, message(&e)), (404, "unknown account `nobody`"));

    // Other methods still reach the router (405), other paths the proxy.
    let a = s.call(false, "GET", "/v1/check", &[], "").await;
    assert_eq!(a.status, 405);
    let a = s.call(false, "GET", "/v1/check/", &[], "").await;
    assert_eq!(
        a.status, 401,
        "proxied, so the key is asked for: {}",
        a.text
    );
    s.running.shutdown().await;
}
