//! Store operations, each on a fresh SQLite file and a fresh PostgreSQL database.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Kind, Seed, TestDb, fresh_session, idle_sessions};
use session_sweeper::store::{
    ClaimParams, Decision, Finding, Outcome, Recheck, RequeueFilter, Settlement, Store, StoreError,
    WorkerInfo,
};

fn params(worker: &str, now: DateTime<Utc>, limit: u32) -> ClaimParams<'_> {
    ClaimParams {
        worker,
        idle_before: now - Duration::from_secs(1800),
        stale_after: Duration::from_secs(15),
        lease: Duration::from_secs(300),
        limit,
    }
}

async fn register(store: &dyn Store, id: &str) {
    let w = WorkerInfo {
        id: id.into(),
        hostname: "test-host".into(),
        pid: 999_999,
    };
    store.heartbeat(&w).await.unwrap();
}

fn settle(token: &str, outcome: Outcome, attempts: u32) -> Settlement {
    Settlement {
        token: token.into(),
        attempt: attempts,
        calls: vec![],
        decision: Decision::Settle {
            outcome,
            attempts,
            retry_in: None,
            error_code: None,
            error_message: None,
        },
    }
}

async fn migrate_is_idempotent(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert!(store.pending_migrations().await.unwrap().is_empty());
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_schema_migrations")
            .await,
        if kind == Kind::MySql { 1 } else { 3 },
        "every migration recorded once"
    );
    // The source table's schema is untouched.
    db.seed(&idle_sessions("s", 1)).await;
    assert_eq!(db.scalar("SELECT COUNT(*) FROM checkout_sessions").await, 1);
}

async fn check_finds_missing_table_column_and_index(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    let findings = store.check().await.unwrap();
    assert!(
        findings.iter().all(|f| matches!(f, Finding::Ok(_))),
        "{findings:?}"
    );

    // A missing table or column is an error that names the key and the missing name.
    for (var, value, key) in [
        ("SWEEPER_SOURCE__TABLE", "no_such_table", "source.table"),
        (
            "SWEEPER_SOURCE__MEMBER_COLUMN",
            "member_id",
            "source.member_column",
        ),
        (
            "SWEEPER_SOURCE__LAST_ACTIVITY_COLUMN",
            "touched_at",
            "source.last_activity_column",
        ),
    ] {
        let config = db.config("http://127.0.0.1:9", &[(var, value)]);
        let findings = session_sweeper::store::open(&config)
            .await
            .unwrap()
            .check()
            .await
            .unwrap();
        assert!(
            findings
                .iter()
                .any(|f| matches!(f, Finding::Error(m) if m.contains(key) && m.contains(value))),
            "{key}: {findings:?}"
        );
    }

    db.exec(match kind {
        Kind::MySql => "DROP INDEX checkout_sessions_idle ON checkout_sessions",
        _ => "DROP INDEX checkout_sessions_idle",
    })
    .await;
    let findings = store.check().await.unwrap();
    let warning = findings
        .iter()
        .find_map(|f| match f {
            Finding::Warning(m) => Some(m.clone()),
            _ => None,
        })
        .expect("a warning for the missing index");
    assert!(warning.contains("CREATE INDEX"), "{warning}");
    assert!(
        warning.contains("\"status\", \"last_activity_at\"")
            || warning.contains("`status`, `last_activity_at`"),
        "{warning}"
    );
    assert!(
        !findings.iter().any(|f| matches!(f, Finding::Error(_))),
        "a missing index is only a warning"
    );
}

async fn only_active_idle_unsettled_sessions_are_eligible(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    let mut rows = idle_sessions("idle", 3);
    rows.push(fresh_session("fresh"));
    rows.push(Seed {
        status: "PASSIVE",
        ..idle_sessions("passive", 1).remove(0)
    });
    db.seed(&rows).await;
    let now = Utc::now();
    let eligible = store.eligible(params("w", now, 100)).await.unwrap();
    let mut tokens: Vec<_> = eligible.iter().map(|s| s.token.clone()).collect();
    tokens.sort();
    assert_eq!(tokens, ["idle-0", "idle-1", "idle-2"]);
    assert!(
        eligible
            .iter()
            .all(|s| s.idle_for >= Duration::from_secs(7190))
    );
    assert_eq!(store.count_eligible(params("w", now, 0)).await.unwrap(), 3);

    // Settled for good: not eligible again, even with mark_passive off.
    register(&*store, "w").await;
    let leases = store.claim(params("w", now, 1)).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        store
            .count_eligible(params("w", Utc::now(), 0))
            .await
            .unwrap(),
        2,
        "a leased session is not eligible"
    );
    store
        .record("w", &[settle(&leases[0].token, Outcome::Failed, 1)])
        .await
        .unwrap();
    assert_eq!(
        store
            .count_eligible(params("w", Utc::now(), 0))
            .await
            .unwrap(),
        2,
        "a failed session is not eligible"
    );
}

/// A sweep counts its work beside its first claims: what it counts is the same whether its own
/// claims came first or not, while another worker's lease still keeps a session out.
async fn a_sweeps_count_is_the_same_before_and_after_its_own_claims(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    let mut rows = idle_sessions("idle", 5);
    rows.push(fresh_session("fresh"));
    db.seed(&rows).await;
    let now = Utc::now();
    let to_sweep = |worker| {
        let store = &store;
        async move {
            let snapshot = store.snapshot().await?;
            Ok::<_, StoreError>(store.counts_in(snapshot, params(worker, now, 0)).await?.1)
        }
    };
    assert_eq!(to_sweep("w").await.unwrap(), 5);
    register(&*store, "w").await;
    register(&*store, "other").await;
    assert_eq!(store.claim(params("w", now, 2)).await.unwrap().len(), 2);
    assert_eq!(
        to_sweep("w").await.unwrap(),
        5,
        "its own leases still count"
    );
    assert_eq!(store.count_eligible(params("w", now, 0)).await.unwrap(), 3);
    assert_eq!(store.claim(params("other", now, 1)).await.unwrap().len(), 1);
    assert_eq!(
        to_sweep("w").await.unwrap(),
        4,
        "another live worker's lease does not"
    );
    assert_eq!(
        to_sweep("other").await.unwrap(),
        3,
        "nor does ours, counted for the other worker"
    );
}

async fn two_workers_never_claim_the_same_session(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 200)).await;
    register(&*store, "a").await;
    register(&*store, "b").await;
    // Each worker claims in its own batch size until nothing is left.
    let claim_all = |worker: &'static str, batch: u32| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let l = store
                    .claim(params(worker, Utc::now(), batch))
                    .await
                    .unwrap();
                if l.is_empty() {
                    return got;
                }
                got.extend(l.into_iter().map(|l| l.token));
            }
        })
    };
    let (a, b) = (claim_all("a", 7), claim_all("b", 5));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut all: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a session was claimed twice");
    assert_eq!(all.len(), 200);
}

async fn leases_of_dead_or_expired_workers_are_reclaimable(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 2)).await;
    register(&*store, "dead").await;
    let now = Utc::now();
    assert_eq!(store.claim(params("dead", now, 1)).await.unwrap().len(), 1);
    // While "dead" heartbeats, its lease holds.
    register(&*store, "alive").await;
    assert_eq!(
        store
            .claim(params("alive", Utc::now(), 10))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .claim(params("alive", Utc::now(), 10))
            .await
            .unwrap()
            .is_empty()
    );
    // Its heartbeat goes stale by the database's clock: its lease no longer counts, long
    // before expiry; ours, still beating, does.
    db.age_heartbeat("dead", 20).await;
    let rescued = store.claim(params("alive", Utc::now(), 10)).await.unwrap();
    assert_eq!(
        rescued.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
        ["s-0"]
    );
    // A forgotten worker's leases count for nothing at once.
    register(&*store, "gone").await;
    db.seed(&idle_sessions("t", 1)).await;
    assert_eq!(
        store
            .claim(params("gone", Utc::now(), 10))
            .await
            .unwrap()
            .len(),
        1
    );
    store.forget_worker("gone").await.unwrap();
    assert_eq!(
        store
            .claim(params("alive", Utc::now(), 10))
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn recording_logs_attempts_then_marking_sets_passive(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 3)).await;
    register(&*store, "w").await;
    let leases = store.claim(params("w", Utc::now(), 10)).await.unwrap();
    assert_eq!(leases.len(), 3);
    let call = session_sweeper::iyzico::CallRecord {
        conversation_id: "c-1".into(),
        http_status: Some(200),
        class: "invalidated",
        error_code: None,
        error_message: None,
        started_at: Utc::now(),
        latency: Duration::from_millis(12),
    };
    let mut inv = settle("s-0", Outcome::Invalidated, 1);
    inv.calls = vec![call.clone(), call];
    let batch = vec![
        inv,
        settle("s-1", Outcome::AlreadyInvalidated, 1),
        Settlement {
            decision: Decision::Settle {
                outcome: Outcome::Pending,
                attempts: 1,
                retry_in: Some(Duration::from_secs(30)),
                error_code: Some("100001".into()),
                error_message: Some("system error".into()),
            },
            ..settle("s-2", Outcome::Pending, 1)
        },
    ];
    let mut accepted = store.record("w", &batch).await.unwrap();
    accepted.sort();
    assert_eq!(accepted, ["s-0", "s-1", "s-2"]);
    // The source is marked in a second step, after the record of the calls is safe.
    assert_eq!(db.status("s-0").await, "ACTIVE");
    assert_eq!(store.unmarked(10).await.unwrap().len(), 2);
    assert_eq!(
        store
            .mark_passive(
                &["s-0".into(), "s-1".into()],
                Utc::now() - Duration::from_secs(1800)
            )
            .await
            .unwrap(),
        2
    );
    assert!(store.unmarked(10).await.unwrap().is_empty());
    assert_eq!(db.status("s-0").await, "PASSIVE");
    assert_eq!(db.status("s-1").await, "PASSIVE");
    assert_eq!(db.status("s-2").await, "ACTIVE");
    assert_eq!(db.ledger("s-0").await, Some(("invalidated".into(), 1)));
    assert_eq!(db.ledger("s-2").await, Some(("pending".into(), 1)));
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_attempts WHERE session_token = 's-0'")
            .await,
        2
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL")
            .await,
        0
    );
    // Pending and not yet due: not claimable.
    assert!(
        store
            .claim(params("w", Utc::now(), 10))
            .await
            .unwrap()
            .is_empty()
    );
    // Due: claimable again, with its attempts carried over.
    db.age_ledger(31).await;
    let due = store.claim(params("w", Utc::now(), 10)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].attempts, 1);
}

async fn a_lost_lease_changes_nothing(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 1)).await;
    register(&*store, "w").await;
    store.claim(params("w", Utc::now(), 10)).await.unwrap();
    assert_eq!(
        store
            .recheck("intruder", "s-0", Utc::now() - Duration::from_secs(1800))
            .await
            .unwrap(),
        Recheck::LeaseLost
    );
    assert_eq!(
        store
            .record("intruder", &[settle("s-0", Outcome::Invalidated, 1)])
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(db.status("s-0").await, "ACTIVE");
    assert_eq!(db.ledger("s-0").await, Some(("pending".into(), 0)));
}

async fn a_session_that_came_back_is_skipped_and_eligible_again_later(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 2)).await;
    register(&*store, "w").await;
    store.claim(params("w", Utc::now(), 10)).await.unwrap();
    db.touch("s-0").await;
    let idle_before = Utc::now() - Duration::from_secs(1800);
    assert_eq!(
        store.recheck("w", "s-0", idle_before).await.unwrap(),
        Recheck::NoLongerEligible
    );
    assert_eq!(
        store.recheck("w", "s-1", idle_before).await.unwrap(),
        Recheck::Eligible
    );
    // s-1 goes pending and comes back to life before its retry: settled as skipped.
    store
        .record(
            "w",
            &[Settlement {
                decision: Decision::Settle {
                    outcome: Outcome::Pending,
                    attempts: 1,
                    retry_in: Some(Duration::ZERO),
                    error_code: None,
                    error_message: None,
                },
                ..settle("s-1", Outcome::Pending, 1)
            }],
        )
        .await
        .unwrap();
    db.touch("s-1").await;
    assert_eq!(
        store
            .skip_revived(params("w", Utc::now(), 0))
            .await
            .unwrap(),
        1
    );
    assert_eq!(db.ledger("s-1").await.unwrap().0, "skipped");
    // Idle again past the threshold (seen from 31 minutes later): eligible again.
    let later = Utc::now() + Duration::from_secs(31 * 60);
    let again = store.claim(params("w", later, 10)).await.unwrap();
    assert!(again.iter().any(|l| l.token == "s-1"), "{again:?}");
}

async fn requeue_and_report(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 4)).await;
    register(&*store, "w").await;
    store.claim(params("w", Utc::now(), 10)).await.unwrap();
    let failed = |t: &str, code: &str| Settlement {
        decision: Decision::Settle {
            outcome: Outcome::Failed,
            attempts: 1,
            retry_in: None,
            error_code: Some(code.into()),
            error_message: Some("Geçersiz istek".into()),
        },
        ..settle(t, Outcome::Failed, 1)
    };
    store
        .record(
            "w",
            &[
                failed("s-0", "11"),
                failed("s-1", "12"),
                settle("s-2", Outcome::Invalidated, 1),
                settle("s-3", Outcome::Skipped, 0),
            ],
        )
        .await
        .unwrap();
    let report = store.report(10).await.unwrap();
    let count = |o: Outcome| report.counts.iter().find(|(k, _)| *k == o).unwrap().1;
    assert_eq!(count(Outcome::Failed), 2);
    assert_eq!(count(Outcome::Invalidated), 1);
    assert_eq!(count(Outcome::Skipped), 1);
    assert_eq!(count(Outcome::AlreadyInvalidated), 0);
    assert_eq!(report.recent_failures.len(), 2);
    assert!(
        report
            .recent_failures
            .iter()
            .all(|f| !f.session.starts_with("s-")),
        "tokens are fingerprinted"
    );
    let n = store
        .requeue(&RequeueFilter {
            error_code: Some("11".into()),
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(db.ledger("s-0").await, Some(("pending".into(), 0)));
    assert_eq!(db.ledger("s-1").await.unwrap().0, "failed");
    assert_eq!(store.requeue(&RequeueFilter::default()).await.unwrap(), 1);
}

async fn eligibility_query_uses_the_index_on_a_million_rows(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    // 1,000,000 rows, 1% of them active and idle.
    match kind {
        Kind::Sqlite => {
            db.exec(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999999) \
                 INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
                 CASE WHEN i % 100 = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
                 datetime('now', '-' || (i % 7200) || ' minutes') FROM n; ANALYZE;",
            )
            .await;
        }
        Kind::Postgres => {
            db.exec(
                "INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
                 CASE WHEN i % 100 = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, now() - (i % 7200) * interval '1 minute' \
                 FROM generate_series(0, 999999) AS i; ANALYZE checkout_sessions;",
            )
            .await;
        }
        Kind::MySql => {
            let digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL \
                          SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL \
                          SELECT 8 UNION ALL SELECT 9)";
            db.exec(&format!(
                "INSERT INTO checkout_sessions SELECT CONCAT('tok-', i), CONCAT('mem-', i), \
                 CASE WHEN i % 100 = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
                 UTC_TIMESTAMP(6) - INTERVAL (i % 7200) MINUTE FROM \
                 (SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d + 100000 * g.d AS i \
                  FROM {digits} a, {digits} b, {digits} c, {digits} e, {digits} f, {digits} g) n; \
                 ANALYZE TABLE checkout_sessions"
            ))
            .await;
        }
    }
    let plan = store
        .explain_claim(params("w", Utc::now(), 500))
        .await
        .unwrap();
    println!("{plan}");
    assert!(
        plan.contains("checkout_sessions_idle"),
        "the plan must use the (status, last activity) index:\n{plan}"
    );
    assert!(!plan.contains("Seq Scan on checkout_sessions"), "{plan}");
    assert!(
        !plan.lines().any(|l| l.trim() == "SCAN s"),
        "a full scan of the source table:\n{plan}"
    );
    assert!(
        store
            .count_eligible(params("w", Utc::now(), 0))
            .await
            .unwrap()
            > 9000
    );
}

async fn renewed_leases_do_not_lapse_while_their_worker_lives(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 3)).await;
    register(&*store, "w").await;
    let now = Utc::now();
    let mut p = params("w", now, 10);
    p.lease = Duration::from_secs(1);
    assert_eq!(store.claim(p).await.unwrap().len(), 3);
    assert_eq!(
        store
            .renew_leases("w", Duration::from_secs(300))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        store
            .renew_leases("nobody", Duration::from_secs(300))
            .await
            .unwrap(),
        0
    );
    // Two seconds on, the first expiry has passed, but the renewed leases of a live worker hold.
    db.age_ledger(2).await;
    register(&*store, "w").await;
    register(&*store, "other").await;
    assert!(
        store
            .claim(params("other", now, 10))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn rechecks_many_sessions_in_one_query_each_by_its_own_verdict(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 70)).await;
    register(&*store, "w").await;
    register(&*store, "other").await;
    let leases = store.claim(params("w", Utc::now(), 69)).await.unwrap();
    assert_eq!(leases.len(), 69);
    let unclaimed: Vec<String> = (0..70)
        .map(|i| format!("s-{i}"))
        .filter(|t| !leases.iter().any(|l| &l.token == t))
        .collect();
    let revived = leases[3].token.clone();
    db.touch(&revived).await;
    let idle_before = Utc::now() - Duration::from_secs(1800);
    // Five sessions (one statement of 16, padded), then all 70 and one nobody knows (64 + 7).
    let five: Vec<&str> = leases[..5].iter().map(|l| l.token.as_str()).collect();
    let verdicts = store.recheck_many("w", &five, idle_before).await.unwrap();
    let expected: Vec<Recheck> = five
        .iter()
        .map(|t| {
            if *t == revived {
                Recheck::NoLongerEligible
            } else {
                Recheck::Eligible
            }
        })
        .collect();
    assert_eq!(verdicts, expected);
    let mut all: Vec<&str> = leases.iter().map(|l| l.token.as_str()).collect();
    all.push(&unclaimed[0]);
    all.push("nobody-knows-me");
    let verdicts = store.recheck_many("w", &all, idle_before).await.unwrap();
    assert_eq!(verdicts.len(), 71);
    for (t, v) in all.iter().zip(&verdicts) {
        let want = match *t {
            t if t == revived => Recheck::NoLongerEligible,
            t if t == unclaimed[0] || t == "nobody-knows-me" => Recheck::LeaseLost,
            _ => Recheck::Eligible,
        };
        assert_eq!(*v, want, "{t}");
    }
    // Another worker's view of the same sessions: none of them is its own.
    let theirs = store
        .recheck_many("other", &five, idle_before)
        .await
        .unwrap();
    assert!(
        theirs.iter().all(|v| *v == Recheck::LeaseLost),
        "{theirs:?}"
    );
    assert!(
        store
            .recheck_many("w", &[], idle_before)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn recording_and_marking_hundreds_at_once(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 300)).await;
    register(&*store, "w").await;
    let leases = store.claim(params("w", Utc::now(), 300)).await.unwrap();
    assert_eq!(leases.len(), 300);
    let call = session_sweeper::iyzico::CallRecord {
        conversation_id: "c".into(),
        http_status: Some(200),
        class: "invalidated",
        error_code: None,
        error_message: None,
        started_at: Utc::now(),
        latency: Duration::from_millis(20),
    };
    // 300 settlements: one piece of 256 and one of 44 padded to 64; the first 10 released.
    let batch: Vec<Settlement> = leases
        .iter()
        .enumerate()
        .map(|(i, l)| Settlement {
            calls: vec![call.clone()],
            decision: if i < 10 {
                Decision::Release
            } else {
                settle(&l.token, Outcome::Invalidated, 1).decision
            },
            ..settle(&l.token, Outcome::Invalidated, 1)
        })
        .collect();
    let accepted = store.record("w", &batch).await.unwrap();
    assert_eq!(accepted.len(), 300);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_attempts").await,
        300
    );
    assert_eq!(db.count_state("invalidated").await, 290);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL")
            .await,
        0
    );
    let invalidated: Vec<String> = leases[10..].iter().map(|l| l.token.clone()).collect();
    let marked = store
        .mark_passive(&invalidated, Utc::now() - Duration::from_secs(1800))
        .await
        .unwrap();
    assert_eq!(marked, 290);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM checkout_sessions WHERE status = 'PASSIVE'")
            .await,
        290
    );
    assert_eq!(db.status(&leases[0].token).await, "ACTIVE");
}

/// A heartbeat renews every lease while a record waits for those rows: once the renewal
/// commits, the record must still settle every session it holds (PostgreSQL re-checks each
/// row it waited for, and an update over a UNION ALL of one-row SELECTs silently lost the
/// rows after the first one).
async fn a_lease_renewal_committing_under_a_waiting_record_loses_no_settlement(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let store = db.store().await;
    // Enough rows for the planner to look sessions up by their key, one after the other.
    db.seed(&idle_sessions("s", 2000)).await;
    register(&*store, "w").await;
    let leases = store.claim(params("w", Utc::now(), 2000)).await.unwrap();
    assert_eq!(leases.len(), 2000);
    // With statistics that say every row is this worker's, PostgreSQL joins by the key.
    match kind {
        Kind::Postgres => db.exec("ANALYZE sweeper_sessions").await,
        Kind::MySql => db.exec("ANALYZE TABLE sweeper_sessions").await,
        Kind::Sqlite => db.exec("ANALYZE").await,
    }
    // A few (joined by key) and a few dozen (joined by hash), each under a waiting renewal.
    let mut settled = 0;
    for n in [4, 40] {
        let batch: Vec<Settlement> = leases[settled..settled + n]
            .iter()
            .map(|l| settle(&l.token, Outcome::Invalidated, 1))
            .collect();
        let accepted = record_under_a_renewal(&db, &store, batch).await;
        assert_eq!(accepted.len(), n, "{accepted:?}");
        settled += n;
        assert_eq!(db.count_state("invalidated").await, settled as i64);
    }
}

/// Records `batch` while another transaction holds every lease of `w` renewed but not yet
/// committed; commits it while the record waits.
async fn record_under_a_renewal(
    db: &TestDb,
    store: &std::sync::Arc<dyn Store>,
    batch: Vec<Settlement>,
) -> Vec<String> {
    sqlx::any::install_default_drivers();
    let mut renewal = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let begin = if db.kind == Kind::Sqlite {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN"
    };
    sqlx::query(begin).execute(&mut renewal).await.unwrap();
    sqlx::query(
        "UPDATE sweeper_sessions SET lease_expires_at = lease_expires_at + 1 WHERE lease_owner = 'w'",
    )
    .execute(&mut renewal)
    .await
    .unwrap();
    let record = {
        let store = store.clone();
        tokio::spawn(async move { store.record("w", &batch).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!record.is_finished(), "the record waits for the renewal");
    sqlx::query("COMMIT").execute(&mut renewal).await.unwrap();
    record.await.unwrap().unwrap()
}

/// A lease renewal (every heartbeat) that the database picks as the victim of a deadlock with
/// another transaction is tried again at once: a deadlock says nothing about the database's
/// health, and a failed beat turns readiness off and, twice over, fences the worker.
async fn a_renewal_that_loses_a_deadlock_is_tried_again(kind: Kind) {
    if kind == Kind::Sqlite {
        return; // one writer at a time: no deadlock to lose
    }
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    if kind == Kind::Postgres {
        // PostgreSQL looks for a cycle once, when a wait reaches deadlock_timeout, and the
        // waiter that looks first is the one ended. The store's sessions (the renewal's) look
        // after 3 s, the other transaction's after a minute: on a loaded machine the cycle may
        // form more than the default 1 s after the renewal began to wait, and then the other
        // transaction was the one that found it.
        db.exec(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET deadlock_timeout = %L', \
             current_database(), '3s'); END $$",
        )
        .await;
    }
    let store = db.store().await;
    db.seed(&idle_sessions("d", 2)).await;
    register(&*store, "w").await;
    assert_eq!(
        store.claim(params("w", Utc::now(), 2)).await.unwrap().len(),
        2
    );
    db.seed(&idle_sessions("z", 100)).await;
    sqlx::any::install_default_drivers();
    let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let lock = |token: &str| {
        format!(
            "SELECT session_token FROM sweeper_sessions WHERE session_token = '{token}' FOR UPDATE"
        )
    };
    if kind == Kind::Postgres {
        sqlx::query("SET deadlock_timeout = '1min'")
            .execute(&mut other)
            .await
            .unwrap();
    }
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    // Heavier than the renewal, so that MySQL picks the renewal as the victim.
    sqlx::query("UPDATE checkout_sessions SET status = 'PASSIVE' WHERE session_token LIKE 'z%'")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query(&lock("d-1")).execute(&mut other).await.unwrap();
    // The renewal takes d-0, then waits for d-1 …
    let renewal = {
        let store = store.clone();
        tokio::spawn(async move { store.renew_leases("w", Duration::from_secs(300)).await })
    };
    // Waiting for it for sure, whatever the load: the database then finds the cycle from the
    // renewal's side first (its deadlock timeout runs out first) and ends the renewal.
    let waiting = match kind {
        Kind::Postgres => {
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'"
        }
        // Under way, it can only be waiting: it cannot end without d-1.
        _ => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND INFO LIKE 'UPDATE sweeper_sessions SET lease_expires_at%'"
        }
    };
    let started = std::time::Instant::now();
    while db.scalar(waiting).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the renewal never waited for d-1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // … while the other transaction asks for d-0: a cycle, and one of the two must go.
    sqlx::query(&lock("d-0")).execute(&mut other).await.unwrap();
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    assert_eq!(renewal.await.unwrap().unwrap(), 2);
}

both_backends!(
    a_sweeps_count_is_the_same_before_and_after_its_own_claims,
    a_renewal_that_loses_a_deadlock_is_tried_again,
    rechecks_many_sessions_in_one_query_each_by_its_own_verdict,
    recording_and_marking_hundreds_at_once,
    a_lease_renewal_committing_under_a_waiting_record_loses_no_settlement,
    renewed_leases_do_not_lapse_while_their_worker_lives,
    migrate_is_idempotent,
    check_finds_missing_table_column_and_index,
    only_active_idle_unsettled_sessions_are_eligible,
    two_workers_never_claim_the_same_session,
    leases_of_dead_or_expired_workers_are_reclaimable,
    recording_logs_attempts_then_marking_sets_passive,
    a_lost_lease_changes_nothing,
    a_session_that_came_back_is_skipped_and_eligible_again_later,
    requeue_and_report,
    eligibility_query_uses_the_index_on_a_million_rows,
);

/// A step's kept connection that the server ended since its last use (a restart, a failover,
/// an administrator) fails at its first statement, and the step is taken up on a fresh one:
/// what the pool's ping on taking a connection did before the steps kept theirs. PostgreSQL
/// only: its `application_name` tells the sweeper's connections from the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_kept_connection_the_server_ended_is_taken_up_on_a_fresh_one() {
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    let store = db.store().await;
    db.seed(&idle_sessions("s", 3)).await;
    let end_the_sweepers_connections = || async {
        let ended = db
            .scalar(
                "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'session-sweeper'",
            )
            .await;
        assert!(ended >= 1, "the step kept its connection");
        // The server ends them at once; well within the time a lane keeps a connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    register(&*store, "w").await;
    end_the_sweepers_connections().await;
    let claimed = store.claim(params("w", Utc::now(), 1)).await.unwrap();
    assert_eq!(claimed.len(), 1, "the claim, on a fresh connection");
    let tokens = [claimed[0].token.as_str()];
    let idle_before = Utc::now() - Duration::from_secs(1800);
    let recheck = || store.recheck_many("w", &tokens, idle_before);
    assert_eq!(recheck().await.unwrap(), [Recheck::Eligible]);
    end_the_sweepers_connections().await;
    assert_eq!(
        recheck().await.unwrap(),
        [Recheck::Eligible],
        "the hot path's lanes alike"
    );
    register(&*store, "w").await;
    end_the_sweepers_connections().await;
    assert!(store.pending_migrations().await.unwrap().is_empty());
    assert_eq!(store.release_all("w").await.unwrap(), 1);
}

/// A session the server ended (a restart, a failover) is a passing trouble, which start-up
/// waits out and tries again, not a broken configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_server_ended_is_a_passing_trouble() {
    use sqlx::Connection as _;
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    db.exec(&format!("SELECT pg_terminate_backend({pid})"))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let source = sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let e = StoreError::Database {
        op: "testing",
        source,
    };
    assert!(e.is_transient(), "{e}");
}

/// A statement the server cut short at its time limit (MariaDB's `max_statement_time`: a
/// role's or the server's setting) is an answer, not a session the server ended, though MariaDB
/// gives it the same SQLSTATE, 70100, as a connection it killed: the session lives on, and the
/// same statement is cut short again however long start-up waits. A mistake in the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_cut_short_at_the_servers_time_limit_is_no_passing_trouble() {
    use sqlx::Connection as _;
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let source = sqlx::query("SET STATEMENT max_statement_time = 0.01 FOR SELECT SLEEP(1)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        source.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("70100"),
        "{source}"
    );
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("the session lives on");
    let e = StoreError::Database {
        op: "testing",
        source,
    };
    assert!(!e.is_transient(), "{e}");
}

/// SQLite stores timestamps in one of four ways; each must select the same sessions.
#[tokio::test]
async fn sqlite_timestamp_formats_select_the_same_sessions() {
    for (format, column_type, idle, fresh) in [
        (
            "rfc3339",
            "TEXT",
            "'2020-01-01T00:00:00Z'",
            "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
        ),
        (
            "unix_seconds",
            "INTEGER",
            "1577836800",
            "CAST(strftime('%s', 'now') AS INTEGER)",
        ),
        (
            "unix_millis",
            "INTEGER",
            "1577836800000",
            "CAST(strftime('%s', 'now') AS INTEGER) * 1000",
        ),
        (
            "sqlite_text",
            "TEXT",
            "'2020-01-01 00:00:00'",
            "CURRENT_TIMESTAMP",
        ),
    ] {
        let db = TestDb::new(Kind::Sqlite).await.unwrap();
        db.exec(&format!(
            "DROP TABLE checkout_sessions; \
             CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT, status TEXT, last_activity_at {column_type}); \
             CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at); \
             INSERT INTO checkout_sessions VALUES ('old', 'm', 'ACTIVE', {idle}), ('new', 'm', 'ACTIVE', {fresh});"
        ))
        .await;
        let config = db.config(
            "http://127.0.0.1:9",
            &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", format)],
        );
        let store = session_sweeper::store::open(&config).await.unwrap();
        store.migrate().await.unwrap();
        let eligible = store.eligible(params("w", Utc::now(), 10)).await.unwrap();
        let tokens: Vec<_> = eligible.iter().map(|s| s.token.as_str()).collect();
        assert_eq!(tokens, ["old"], "format {format}");
        assert!(
            eligible[0].idle_for > Duration::from_secs(86400 * 365),
            "format {format}: {:?}",
            eligible[0].idle_for
        );
    }
}

/// The claim's locking read, as the MySQL store runs it: READ COMMITTED, `FOR UPDATE SKIP
/// LOCKED` over the (status, last activity) index. Held open here, it must not keep the shop
/// from writing new sessions into the same index range (REPEATABLE READ's gap locks would).
#[tokio::test]
async fn a_mysql_claim_takes_no_gap_locks_that_block_the_shops_writes() {
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    db.seed(&idle_sessions("s", 20)).await;
    let common::Pool::MySql(pool) = &db.pool else {
        unreachable!()
    };
    let mut claimer = pool.acquire().await.unwrap();
    for statement in [
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "BEGIN",
        "SELECT session_token FROM checkout_sessions WHERE status = 'ACTIVE' \
         AND last_activity_at < UTC_TIMESTAMP(6) - INTERVAL 30 MINUTE \
         ORDER BY last_activity_at LIMIT 10 FOR UPDATE SKIP LOCKED",
    ] {
        sqlx::raw_sql(statement)
            .execute(&mut *claimer)
            .await
            .unwrap();
    }
    // The shop, meanwhile: a new session whose activity falls inside the locked range.
    let mut shop = pool.acquire().await.unwrap();
    sqlx::raw_sql("SET SESSION innodb_lock_wait_timeout = 2")
        .execute(&mut *shop)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    sqlx::raw_sql(
        "INSERT INTO checkout_sessions VALUES ('new', 'm', 'ACTIVE', UTC_TIMESTAMP(6) - INTERVAL 150 MINUTE)",
    )
    .execute(&mut *shop)
    .await
    .expect("the shop's insert is not blocked by the claim");
    assert!(started.elapsed() < Duration::from_millis(1500));
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut *claimer)
        .await
        .unwrap();
}
