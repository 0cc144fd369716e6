//! Migrations, readiness, timeouts and the connection pool.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_twice_and_from_two_instances_at_once() {
    let db = test_db!();
    let first = db.open().await;
    first.ready().await.expect("ready after migrating");
    drop(first);
    // Again on a migrated database, and from two instances starting together.
    let (a, b) = tokio::join!(
        PostgresStore::open(&db.url, SETTINGS, true, ring()),
        PostgresStore::open(&db.url, SETTINGS, true, ring())
    );
    let (a, b) = (a.expect("opens"), b.expect("opens"));
    a.ready().await.expect("ready");
    b.ready().await.expect("ready");
    let sql = db.sql().await;
    let versions: Vec<i32> = sql
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await
        .expect("reads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, every_version());
    // Pooled connections carry the statement timeout that bounds every query.
    let timeout = a
        .run(|c| Box::pin(async move { Ok(c.query_one("SHOW statement_timeout", &[]).await?.get::<_, String>(0)) }))
        .await
        .expect("shows");
    assert_eq!(timeout, "10s");
    // At most one current signing key, whatever the code does.
    sql.batch_execute("INSERT INTO signing_keys VALUES ('a', '\\x00', '\\x00', now(), NULL)").await.expect("first");
    let second = sql.batch_execute("INSERT INTO signing_keys VALUES ('b', '\\x00', '\\x00', now(), NULL)").await;
    assert_eq!(second.expect_err("a second current key").code().map(|c| c.code()), Some("23505"));
}

/// The version of every migration this build has.
fn every_version() -> Vec<i32> {
    crate::store::postgres::schema::MIGRATIONS.iter().map(|(version, ..)| *version).collect()
}

/// The versions recorded as applied.
async fn history(sql: &tokio_postgres::Client) -> Vec<i32> {
    let rows = sql.query("SELECT version FROM schema_migrations ORDER BY version", &[]).await.expect("reads");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_migrating_an_empty_database_at_once_apply_each_migration_once() {
    let db = test_db!();
    let (a, b, c) = tokio::join!(db.open(), db.open(), db.open());
    for store in [a, b, c] {
        store.ready().await.expect("ready");
    }
    assert_eq!(history(&db.sql().await).await, every_version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_migrated_is_not_ready() {
    let db = test_db!();
    let store = PostgresStore::open(&db.url, SETTINGS, false, ring()).await.expect("opens without migrating");
    assert!(matches!(store.ready().await, Err(StoreError::Unavailable(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_without_hanging() {
    // Needs no server: nothing listens on port 1. The open must come back with Unavailable (the
    // refused connect), not hang; the generous timeout only keeps a hang from stalling the run.
    let open = PostgresStore::open("postgres://postgres@127.0.0.1:1/none", SETTINGS, true, ring());
    let result = tokio::time::timeout(HANG_GUARD, open).await.expect("opening an unreachable server hung");
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{:?}", result.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_runs_too_long_is_unavailable_and_its_connection_is_closed() {
    let db = test_db!();
    let store = db.open().await;
    // The statement would sleep for an hour: no statement_timeout ends it, and the server does
    // not notice a closed socket while it runs. Only the cancel of the call's limit ends it.
    let result = store
        .run_within(Duration::from_millis(300), |c| {
            Box::pin(async move {
                c.batch_execute("SET statement_timeout = 0").await?;
                c.batch_execute("SELECT pg_sleep(3600)").await?;
                Ok(())
            })
        })
        .await;
    // The call's own limit gave up on it: its error, not one of the statement's.
    assert!(
        matches!(&result, Err(StoreError::Unavailable(message)) if message == "the database did not answer in time"),
        "{result:?}"
    );
    // The statement was cancelled and the connection closed, not handed to the next caller: the
    // server ends its session (the generous deadline only keeps a failure from hanging).
    let sql = db.sql().await;
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let row = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE query = 'SELECT pg_sleep(3600)' AND datname = current_database()",
                &[],
            )
            .await
            .expect("counts");
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the abandoned statement's session never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.list_merchants().await.expect("the pool goes on with a fresh connection");

    // The server's own bound, statement_timeout, is a 503 too.
    let timed_out = store
        .run(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.batch_execute("SET LOCAL statement_timeout = '50ms'; SELECT pg_sleep(5)").await?;
                Ok(())
            })
        })
        .await;
    assert!(matches!(timed_out, Err(StoreError::Unavailable(_))), "{timed_out:?}");
    // Whereas a plain SQL error is Internal.
    let broken =
        store.run(|c| Box::pin(async move { Ok(c.batch_execute("SELECT * FROM no_such_table").await?) })).await;
    assert!(matches!(broken, Err(StoreError::Internal(_))), "{broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_round_trip_to_the_millisecond() {
    let db = test_db!();
    let store = db.open().await;
    let instants =
        [NOW, Timestamp::from_millis(946_684_799_999), Timestamp::from_millis(-1), Timestamp::from_millis(1)];
    for at in instants {
        merchant(&store, at).await;
    }
    let mut stored: Vec<i64> =
        store.list_merchants().await.expect("lists").iter().map(|m| m.created_on.millis()).collect();
    let mut expected: Vec<i64> = instants.iter().map(|t| t.millis()).collect();
    stored.sort_unstable();
    expected.sort_unstable();
    assert_eq!(stored, expected);
}

/// The migrations before event data became text (migration 8).
const UP_TO_7: [&str; 7] = [
    include_str!("../../../../migrations/postgres/0001_init.sql"),
    include_str!("../../../../migrations/postgres/0002_webhooks.sql"),
    include_str!("../../../../migrations/postgres/0003_customer_flow.sql"),
    include_str!("../../../../migrations/postgres/0004_qr_code_success_url.sql"),
    include_str!("../../../../migrations/postgres/0005_delivery_claims.sql"),
    include_str!("../../../../migrations/postgres/0006_idempotency_session_answers.sql"),
    include_str!("../../../../migrations/postgres/0007_subscription_operations.sql"),
];

/// Events stored as `jsonb` (in `jsonb`'s own key order) are rewritten by migration 8 as the
/// exact text the service writes and sends: webhook bodies stay byte-identical to SQLite's
/// whenever their event was stored (docs/DESIGN.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_8_rewrites_stored_event_data_as_the_text_sent() {
    let db = test_db!();
    let sql = db.sql().await;
    for migration in UP_TO_7 {
        sql.batch_execute(migration).await.expect("migrates");
    }
    let m = Uuid::now_v7();
    let plain = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(60));
    let mut linked = session(Uuid::now_v7(), m, spec_with(None, "2"), NOW, Duration::from_secs(60));
    (linked.customer_id, linked.transaction_intent_id) = (Some(Uuid::now_v7()), Some(Uuid::now_v7()));
    let expected = [
        (plain.id, crate::store::event_data(&plain, State::Cancelled, NOW)),
        (linked.id, crate::store::event_data(&linked, State::Completed, NOW.plus(Duration::from_secs(1)))),
        (Uuid::nil(), serde_json::json!({ "subscriptionId": Uuid::now_v7() }).to_string()),
    ];
    for (session_id, data) in &expected {
        sql.execute(
            "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
             VALUES ($1, $2, $3, 'RedirectSessionCancelled', $4::text::jsonb, $5)",
            &[&Uuid::now_v7(), &m, session_id, data, &Ts(NOW)],
        )
        .await
        .expect("stores an event as jsonb");
    }
    let stored = |id: Uuid| {
        let sql = &sql;
        async move {
            let row = sql.query_one("SELECT data::text FROM events WHERE session_id = $1", &[&id]).await;
            row.expect("reads the event").get::<_, String>(0)
        }
    };
    assert_ne!(stored(linked.id).await, expected[1].1, "jsonb keeps an order (and spacing) of its own");

    sql.batch_execute(include_str!("../../../../migrations/postgres/0008_event_data_text.sql"))
        .await
        .expect("migrates");
    for (session_id, data) in &expected {
        assert_eq!(&stored(*session_id).await, data);
    }
}

/// The sweep's condition (`crate::store::rows::LIVE`, comparisons as SQLite's index needs them)
/// still reads through PostgreSQL's `sessions_due`, whose condition is an `IN` list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_condition_reads_through_the_due_index() {
    let db = test_db!();
    let _store = db.open().await;
    let sql = db.sql().await;
    sql.batch_execute("SET enable_seqscan = off").await.expect("sets");
    let live = crate::store::rows::LIVE.as_str();
    let plan: Vec<String> = sql
        .query(&format!("EXPLAIN SELECT id FROM sessions WHERE {live} AND expires_on <= now()"), &[])
        .await
        .expect("explains")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(plan.iter().any(|line| line.contains("sessions_due")), "{plan:?}");
}

#[test]
fn times_encode_as_microseconds_since_2000() {
    use bytes::BytesMut;
    use tokio_postgres::types::{ToSql, Type};
    let mut out = BytesMut::new();
    Ts(Timestamp::from_millis(946_684_800_000 + 1_234)).to_sql(&Type::TIMESTAMPTZ, &mut out).expect("encodes");
    assert_eq!(i64::from_be_bytes(out[..].try_into().expect("8 bytes")), 1_234_000);
}
