//! The harness itself works: a server starts, a session is created and read back.

mod common;

use common::*;

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
