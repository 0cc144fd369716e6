//! Waking the dispatchers of every instance (`LISTEN`/`NOTIFY`), also across reconnects.

use super::*;

/// A connection of the test's own that `LISTEN`s on the dispatchers' channel: it sees every
/// `NOTIFY` the stores send, in commit order, and can send a marker of its own.
struct Watch {
    client: tokio_postgres::Client,
    payloads: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Watch {
    async fn start(url: &str) -> Watch {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.expect("connects");
        let (sender, payloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Polling the connection this way drives it and hands over the notifications.
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = sender.send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client.batch_execute(&format!("LISTEN {}", listen::CHANNEL)).await.expect("listens");
        Watch { client, payloads }
    }

    /// The next notification's payload.
    async fn next(&mut self) -> String {
        let next = tokio::time::timeout(HANG_GUARD, self.payloads.recv()).await;
        next.expect("a notification came").expect("the watching connection is open")
    }

    /// Sends a marker `NOTIFY` and answers the payloads of every notification committed before
    /// it (PostgreSQL delivers them in commit order, the marker included).
    async fn before_marker(&mut self) -> Vec<String> {
        let marker = format!("marker {}", Uuid::now_v7());
        self.client.execute("SELECT pg_notify($1, $2)", &[&listen::CHANNEL, &marker]).await.expect("notifies");
        let mut before = Vec::new();
        loop {
            match self.next().await {
                payload if payload == marker => return before,
                payload => before.push(payload),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queuing_on_one_instance_wakes_the_dispatcher_of_another() {
    let db = test_db!();
    let (a, b) = (db.open().await, db.open().await);
    let wake_b = b.deliveries_queued();
    // The listener wakes once when it starts listening; after that, only NOTIFY does.
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener connected");
    let mut watch = Watch::start(&db.url).await;

    let m = merchant(&a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let s = session(Uuid::now_v7(), m, spec_with(None, "2"), NOW, Duration::from_secs(900));
    a.create_session(s.clone()).await.expect("creates");
    // Nothing was queued yet, and creating queues nothing: no NOTIFY came before the marker.
    assert_eq!(watch.before_marker().await, Vec::<String>::new(), "subscribing or creating sent a NOTIFY");
    // The marker is the one NOTIFY so far: B wakes for it, and for nothing else.
    assert!(woken(&wake_b, HANG_GUARD).await, "B heard the marker");
    assert!(!wake_pending(&wake_b), "B was woken by something other than a NOTIFY");

    a.cancel_session(cancel(m, s.id, NOW)).await.expect("cancels");
    assert_eq!(watch.next().await, "", "the cancel's commit sent a NOTIFY");
    assert!(woken(&wake_b, HANG_GUARD).await, "A's commit woke B");
    assert!(woken(&a.deliveries_queued(), HANG_GUARD).await, "and A's own dispatcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_and_the_listener_recover_when_the_server_drops_every_connection() {
    let db = test_db!();
    let (a, b) = (db.open().await, db.open().await);
    let wake_b = b.deliveries_queued();
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener connected");
    let m = merchant(&a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    a.list_merchants().await.expect("a pooled connection exists");

    // What a restart does to every session: terminated by the server (57P01).
    let admin = raw(&db.admin).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .await
        .expect("terminates");

    // The first call may meet a dead connection (then it is Unavailable, never Internal);
    // soon calls succeed on fresh ones (the deadline only keeps a failure from hanging).
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        match a.list_merchants().await {
            Ok(_) => break,
            Err(StoreError::Unavailable(error)) => {
                assert!(std::time::Instant::now() < deadline, "the pool never reconnected: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("a lost connection must be Unavailable: {error}"),
        }
    }
    // B's listener reconnects (and wakes once for what it may have missed), then hears A again.
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener reconnected");
    let s = session(Uuid::now_v7(), m, spec_with(None, "2"), NOW, Duration::from_secs(900));
    a.create_session(s.clone()).await.expect("creates");
    a.cancel_session(cancel(m, s.id, NOW)).await.expect("cancels");
    assert!(woken(&wake_b, HANG_GUARD).await, "A's commit woke B after the reconnect");
}
