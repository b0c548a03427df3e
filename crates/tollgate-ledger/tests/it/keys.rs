//! G2 (hashed storage, wrong secret), G3 (no key in Debug/Display/errors), key
//! lifecycle, cache behaviour and the revocation bound.

use std::time::Duration;

use tollgate_ledger::{KeyCheck, LedgerError, REVOCATION_BOUND, key};

use crate::common::{Kind, Location, account, both, fresh};

/// Full text dump of the database, as an operator's backup would hold it.
fn dump(location: &Location) -> String {
    let out = match location {
        Location::Sqlite(path) => std::process::Command::new("sqlite3")
            .arg(path)
            .arg(".dump")
            .output(),
        Location::Postgres { url, schema } => std::process::Command::new("pg_dump")
            .arg("--dbname")
            .arg(url)
            .arg("-n")
            .arg(schema)
            .output(),
    }
    .expect("run the dump tool");
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 dump")
}

async fn g2_keys_are_stored_hashed(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "k", 0).await;
    let mut keys = Vec::new();
    for app in [None, Some("mobile"), Some("mobile")] {
        keys.push(ledger.create_key("k", app).await.expect("create key"));
    }
    let dump = dump(&db.location);
    assert!(dump.contains(&keys[0].id), "the dump is real");
    for k in &keys {
        let full = k.key.expose();
        let secret = &full[3 + 12..3 + 12 + 32];
        assert!(!dump.contains(full), "plaintext key in dump");
        assert!(!dump.contains(secret), "plaintext secret in dump");
        assert!(matches!(
            ledger.verify_key(full).await.expect("verify"),
            KeyCheck::Valid(_)
        ));
        // right prefix, wrong secret (with a valid checksum)
        let forged = key::forge_for_test(&k.id, &"x".repeat(32));
        assert_eq!(
            ledger.verify_key(&forged).await.expect("verify"),
            KeyCheck::Unknown
        );
        // corrupted checksum
        let mut bad = full.to_owned();
        bad.pop();
        bad.push(if full.ends_with('a') { 'b' } else { 'a' });
        assert_eq!(
            ledger.verify_key(&bad).await.expect("verify"),
            KeyCheck::Unknown
        );
    }
    let KeyCheck::Valid(id) = ledger
        .verify_key(keys[1].key.expose())
        .await
        .expect("verify")
    else {
        panic!()
    };
    assert_eq!(
        (
            id.account.as_str(),
            id.app.as_str(),
            id.org.as_str(),
            id.plan.as_str()
        ),
        ("k", "mobile", "k", "test")
    );
    let listed = ledger.list_keys("k").await.expect("list");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].app, "default");
    assert!(
        listed
            .iter()
            .all(|i| i.prefix == format!("tg_{}", i.id) && !i.revoked)
    );
    assert!(matches!(
        ledger.list_keys("nobody").await,
        Err(LedgerError::NotFound { .. })
    ));
    assert!(matches!(
        ledger.create_key("nobody", None).await,
        Err(LedgerError::NotFound { .. })
    ));

    let revoked = ledger.revoke_key(&keys[0].id).await.expect("revoke");
    assert!(revoked.revoked);
    assert_eq!(
        ledger
            .verify_key(keys[0].key.expose())
            .await
            .expect("verify"),
        KeyCheck::Revoked {
            key_id: keys[0].id.clone()
        },
        "revocation is immediate on the replica that revoked"
    );
    assert!(matches!(
        ledger.revoke_key("nope").await,
        Err(LedgerError::NotFound { .. })
    ));
}
both!(g2_hashed_keys, super::g2_keys_are_stored_hashed);

/// G3: keys never show in Debug/Display of the values and errors that carry them.
async fn g3_keys_never_printed(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "s", 0).await;
    let created = ledger.create_key("s", None).await.expect("key");
    let full = created.key.expose().to_owned();
    let secret = full[15..47].to_owned();
    let check = ledger.verify_key(&full).await.expect("verify");
    let mut printed = vec![
        format!("{created:?}"),
        format!("{}", created.key),
        format!("{:?}", created.key),
        format!("{check:?}"),
        format!("{ledger:?}"),
        format!("{:?}", ledger.list_keys("s").await.expect("list")),
    ];
    // errors around keys
    for e in [
        ledger.create_key("missing", None).await.err(),
        ledger.revoke_key(&full).await.err(),
    ] {
        let e = e.expect("an error");
        printed.push(format!("{e}"));
        printed.push(format!("{e:?}"));
    }
    for p in &printed {
        assert!(
            !p.contains(&full) && !p.contains(&secret),
            "key leaked in {p}"
        );
    }
    assert_eq!(format!("{}", created.key), "***");
}
both!(g3_no_key_in_output, super::g3_keys_never_printed);

/// Verifies `presented` (a key revoked on another replica, still cached
/// here as valid) until it is seen revoked, which must happen within
/// `REVOCATION_BOUND`; returns how long it took.
async fn revocation_seen_within_the_bound(
    ledger: &tollgate_ledger::Ledger,
    presented: &str,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        match ledger.verify_key(presented).await.expect("verify") {
            KeyCheck::Revoked { .. } => return start.elapsed(),
            KeyCheck::Valid(_) => {}
            KeyCheck::Unknown => panic!("a revoked key is Revoked"),
        }
        assert!(
            start.elapsed() <= REVOCATION_BOUND + Duration::from_millis(300),
            "revocation slower than the bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Malformed keys need no database; unknown ids are cached negatively; a revocation
/// made on another replica takes effect within REVOCATION_BOUND.
async fn key_cache_and_revocation_bound(kind: Kind) {
    let db = fresh(kind).await;
    let replica_a = &db.ledger;
    let replica_b = db.location.open().await;
    account(replica_a, "c", 0).await;
    let k = replica_a.create_key("c", None).await.expect("key");
    assert!(matches!(
        replica_b.verify_key(k.key.expose()).await.expect("v"),
        KeyCheck::Valid(_)
    ));
    replica_a.revoke_key(&k.id).await.expect("revoke");
    // replica B still has it cached as valid; it must flip within the bound
    let took = revocation_seen_within_the_bound(&replica_b, k.key.expose()).await;
    println!("revocation seen by the other replica after {took:?}");

    let unknown = key::forge_for_test("AAAAAAAAAAAA", &"b".repeat(32));
    assert_eq!(
        replica_b.verify_key(&unknown).await.expect("v"),
        KeyCheck::Unknown
    );
    replica_b.close().await;
    // with the pool closed: malformed → no query; unknown id → negative cache
    assert_eq!(
        replica_b
            .verify_key("tg_garbage")
            .await
            .expect("no DB needed"),
        KeyCheck::Unknown
    );
    assert_eq!(
        replica_b.verify_key(&unknown).await.expect("cached"),
        KeyCheck::Unknown
    );
    let uncached = key::forge_for_test("BBBBBBBBBBBB", &"b".repeat(32));
    let err = replica_b
        .verify_key(&uncached)
        .await
        .expect_err("needs the DB");
    assert!(err.is_unavailable(), "{err:?}");
}
both!(key_cache, super::key_cache_and_revocation_bound);

/// The lookups without a future answer only from what was read lately, and
/// never longer than the awaited lookups would: an unread key or account is
/// `None` (ask the cache behind), a read one is the same answer, and a change
/// made on this replica is never answered from before it.
async fn lookups_now_answer_only_what_was_read(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "n", 0).await;
    let k = ledger.create_key("n", None).await.expect("key");
    // Malformed: no lookup needed.
    assert_eq!(ledger.verify_key_now("tg_garbage"), Some(KeyCheck::Unknown));
    assert_eq!(ledger.verify_key_now(k.key.expose()), None);
    let read = ledger.verify_key(k.key.expose()).await.expect("verify");
    assert!(matches!(read, KeyCheck::Valid(_)));
    assert_eq!(ledger.verify_key_now(k.key.expose()), Some(read));
    // The right id with a wrong secret is still judged.
    let forged = key::forge_for_test(&k.id, &"x".repeat(32));
    assert_eq!(ledger.verify_key_now(&forged), Some(KeyCheck::Unknown));
    ledger.revoke_key(&k.id).await.expect("revoke");
    assert!(
        !matches!(
            ledger.verify_key_now(k.key.expose()),
            Some(KeyCheck::Valid(_))
        ),
        "a key revoked here is not valid without waiting"
    );

    // Ids no account can have: no lookup needed.
    assert_eq!(ledger.account_identity_now(""), Some(None));
    assert_eq!(ledger.account_identity_now(&"a".repeat(129)), Some(None));
    assert!(ledger.account_identity_now("n").is_none());
    let read = ledger.account_identity("n").await.expect("read");
    let now = ledger.account_identity_now("n").expect("read lately");
    assert_eq!(now.as_deref(), read.as_deref());
    assert!(ledger.account_identity_now("nobody").is_none());
    assert_eq!(ledger.account_identity("nobody").await.expect("read"), None);
    assert_eq!(ledger.account_identity_now("nobody"), Some(None));
    ledger
        .update_account(
            "n",
            &tollgate_ledger::AccountChange {
                plan: Some("other".to_owned()),
                overrides: None,
            },
        )
        .await
        .expect("update");
    if let Some(Some(identity)) = ledger.account_identity_now("n") {
        assert_eq!(
            identity.plan, "other",
            "a plan changed here is seen at once"
        );
    }
}
both!(lookups_now, super::lookups_now_answer_only_what_was_read);

/// A key or account in use is read again before the end of
/// `REVOCATION_BOUND`, in the background: lookups keep being answered from
/// memory past the bound of the first read (no request waits for the
/// database), with one extra read each; a change made elsewhere still shows
/// within the bound.
async fn hot_identities_are_read_again_before_the_bound(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    let other_replica = db.location.open().await;
    account(ledger, "h", 0).await;
    let k = ledger.create_key("h", None).await.expect("key");
    assert!(matches!(
        ledger.verify_key(k.key.expose()).await.expect("verify"),
        KeyCheck::Valid(_)
    ));
    assert!(ledger.account_identity("h").await.expect("read").is_some());
    // Ids with no key or account behind them are not read ahead.
    let unknown = key::forge_for_test("AAAAAAAAAAAA", &"b".repeat(32));
    assert_eq!(
        ledger.verify_key(&unknown).await.expect("verify"),
        KeyCheck::Unknown
    );
    assert_eq!(ledger.account_identity("nobody").await.expect("read"), None);
    let read_at = tokio::time::Instant::now();
    let lookups = ledger.identity_lookups();
    // Past three quarters of the bound: still answered from memory, and
    // the first lookup of each starts a read in the background.
    tokio::time::sleep(REVOCATION_BOUND * 3 / 4 + Duration::from_millis(100)).await;
    assert!(matches!(
        ledger.verify_key_now(k.key.expose()),
        Some(KeyCheck::Valid(_))
    ));
    assert!(matches!(ledger.account_identity_now("h"), Some(Some(_))));
    assert_eq!(ledger.verify_key_now(&unknown), Some(KeyCheck::Unknown));
    assert_eq!(ledger.account_identity_now("nobody"), Some(None));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while ledger.identity_lookups() < lookups + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no background read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past the bound of the first read: answered without waiting.
    tokio::time::sleep_until(read_at + REVOCATION_BOUND + Duration::from_millis(100)).await;
    assert!(
        matches!(
            ledger.verify_key_now(k.key.expose()),
            Some(KeyCheck::Valid(_))
        ),
        "the key was read again in time"
    );
    assert!(
        matches!(ledger.account_identity_now("h"), Some(Some(_))),
        "the account was read again in time"
    );
    assert_eq!(ledger.identity_lookups(), lookups + 2, "one read each");
    // A revocation made on another replica still shows within the bound.
    other_replica.revoke_key(&k.id).await.expect("revoke");
    revocation_seen_within_the_bound(ledger, k.key.expose()).await;
    other_replica.close().await;
}
both!(
    read_ahead,
    super::hot_identities_are_read_again_before_the_bound
);
