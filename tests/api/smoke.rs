//! The harness itself works: a server starts on the backend under test
//! (`REDIRECT_SESSIONS_TEST_BACKEND`), a session is created and read back, and a PostgreSQL test
//! database is gone once its test is done — also when the test panicked.

use crate::common::*;
use redirect_sessions::config::DatabaseUrl;

#[tokio::test]
async fn a_created_session_can_be_read_back() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let (status, body) = status_and_json(server.get_session(id).await).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["state"], "Created");
    server.stop().await;
}

/// Whether PostgreSQL has a database called `name`.
async fn postgres_has_database(name: &str) -> bool {
    let admin = connect_postgres(&postgres_admin_url().expect("an admin URL on PostgreSQL")).await;
    let row = admin.query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&name]).await.unwrap();
    row.get::<_, i64>(0) == 1
}

#[tokio::test]
async fn the_server_stores_on_the_backend_under_test_and_its_database_goes_away_with_it() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    match backend() {
        Backend::Sqlite => {
            assert!(matches!(server.state.config.database_url, DatabaseUrl::Sqlite { .. }));
            assert!(server.database().sqlite_path().is_some_and(|path| path.is_file()));
            server.stop().await;
        }
        Backend::Postgres => {
            assert!(matches!(server.state.config.database_url, DatabaseUrl::Postgres(_)));
            let sql = server.database().sql().await;
            let row = sql.query_one("SELECT state FROM sessions WHERE id = $1", &[&id]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), "Created", "the session is in this test's database");
            drop(sql);
            let name = server.database().postgres_name().unwrap().to_owned();
            assert!(name.starts_with("rs_test_"), "{name}");
            server.stop().await;
            assert!(!postgres_has_database(&name).await, "{name} is dropped when the server stops");
        }
    }
}

#[tokio::test]
async fn a_postgres_test_database_is_dropped_when_its_test_panics() {
    if !on_postgres() {
        skip("only PostgreSQL test databases outlive their test unless dropped");
        return;
    }
    let panicked = std::thread::spawn(|| {
        let database = TestDatabase::fresh();
        std::panic::panic_any(database.postgres_name().unwrap().to_owned());
    })
    .join()
    .expect_err("the thread panicked");
    let name = panicked.downcast::<String>().expect("the database's name");
    assert!(!postgres_has_database(&name).await, "{name} is dropped while the panic unwinds");
}
