//! Accounts, plans, overrides and the events outbox.

use serde_json::json;
use tollgate_ledger::{AccountChange, LedgerError, NewAccount, NewEvent};

use crate::common::{Kind, both, fresh};

async fn accounts_and_events(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    let created_at: jiff::Timestamp = "2025-01-02T03:04:05Z".parse().expect("ts");
    let a = ledger
        .create_account(&NewAccount {
            id: "acme".into(),
            plan: "free".into(),
            org: None,
            created_at: Some(created_at),
            grant: 200,
        })
        .await
        .expect("create");
    assert_eq!(
        (a.org.as_str(), a.balance, a.created_at),
        ("acme", 200, created_at)
    );
    assert_eq!(a.overrides, json!({}));
    let again = ledger
        .create_account(&NewAccount {
            id: "acme".into(),
            plan: "free".into(),
            org: None,
            created_at: None,
            grant: 200,
        })
        .await;
    assert!(matches!(again, Err(LedgerError::AlreadyExists { .. })));
    assert_eq!(
        ledger.balance("acme").await.expect("b"),
        200,
        "no second grant"
    );
    let b = ledger
        .create_account(&NewAccount {
            id: "beta".into(),
            plan: "enterprise".into(),
            org: Some("bigco".into()),
            created_at: None,
            grant: 0,
        })
        .await
        .expect("create");
    assert_eq!(b.org, "bigco");
    assert!(ledger.account("nobody").await.expect("get").is_none());
    let changed = ledger
        .update_account(
            "beta",
            &AccountChange {
                plan: Some("standard".into()),
                overrides: Some(json!({"limits": {"images": 600}})),
            },
        )
        .await
        .expect("update");
    assert_eq!(changed.plan, "standard");
    assert_eq!(
        ledger
            .account("beta")
            .await
            .expect("get")
            .expect("some")
            .overrides,
        json!({"limits": {"images": 600}})
    );
    assert!(matches!(
        ledger
            .update_account("nobody", &AccountChange::default())
            .await,
        Err(LedgerError::NotFound { .. })
    ));
    assert!(matches!(
        ledger
            .update_account(
                "beta",
                &AccountChange {
                    plan: None,
                    overrides: Some(json!([1]))
                }
            )
            .await,
        Err(LedgerError::InvalidInput { .. })
    ));
    assert!(matches!(
        ledger
            .create_account(&NewAccount {
                id: "".into(),
                plan: "p".into(),
                org: None,
                created_at: None,
                grant: 0
            })
            .await,
        Err(LedgerError::InvalidInput { .. })
    ));
    let audit = ledger.audit("acme").await.expect("audit");
    assert_eq!((audit.grants, audit.balance), (200, 200));

    for i in 0..3 {
        ledger
            .record_event(&NewEvent {
                account: Some("acme".into()),
                kind: "credits_low".into(),
                data: json!({"i": i}),
            })
            .await
            .expect("event");
    }
    ledger
        .record_event(&NewEvent {
            account: None,
            kind: "limit_rejections".into(),
            data: json!({"limit": "x"}),
        })
        .await
        .expect("event");
    let all = ledger.events(None, None, 100).await.expect("events");
    assert_eq!(all.len(), 4);
    let mine = ledger
        .events(Some("acme"), None, 100)
        .await
        .expect("events");
    assert_eq!(
        mine.iter()
            .map(|e| e.data["i"].as_i64().expect("i"))
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let later = ledger
        .events(None, Some(all[3].at), 100)
        .await
        .expect("events");
    assert!(later.iter().all(|e| e.at >= all[3].at) && !later.is_empty());
    assert_eq!(ledger.events(None, None, 2).await.expect("events").len(), 2);
}
both!(accounts_and_events_outbox, super::accounts_and_events);

/// A database that cannot be opened says why in plain words and what to change
/// (no PostgreSQL source line, no message repeated).
#[tokio::test]
async fn open_errors_say_what_to_fix() {
    let pg = crate::common::pg_url();
    let base = pg.split_once('@').map_or(pg.as_str(), |(_, host)| host);
    let cases = [
        (
            format!("postgres://no_such_role_tg@{base}"),
            "role \"no_such_role_tg\" does not exist (name an existing role",
        ),
        (
            format!(
                "postgres://postgres@{}/no_such_db_tg",
                base.split('/').next().expect("host")
            ),
            "database \"no_such_db_tg\" does not exist (create it first",
        ),
        (
            "/proc/no/such/dir/ledger.db".to_owned(),
            "unable to open database file (check that the directory exists",
        ),
    ];
    for (url, want) in cases {
        let Err(e) = tollgate_ledger::Ledger::open(&url).await else {
            panic!("{url} opened");
        };
        let shown = e.to_string();
        assert!(matches!(e, LedgerError::Open { .. }), "{url}: {e:?}");
        assert!(shown.starts_with(want), "{url}: {shown}");
        assert!(!shown.contains("at line"), "{shown}");
        assert!(e.is_unavailable());
    }
}
