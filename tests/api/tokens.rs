//! Session tokens (docs/DESIGN.md "Tokens"): EdDSA JWTs verifiable with the published JWKS, with the
//! documented claims; stable across repeated PUTs; still verifiable after a key rotation.

use crate::common::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use reqwest::Method;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// A compact JWT split into its decoded header and claims, and the raw parts.
struct Jwt {
    header: Value,
    claims: Value,
    signed: String,
    signature: Vec<u8>,
}

fn decode_part(part: &str) -> Value {
    let bytes = URL_SAFE_NO_PAD.decode(part).unwrap_or_else(|e| panic!("not base64url ({e}): {part}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

fn parse_jwt(token: &str) -> Jwt {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS has three parts: {token}");
    Jwt {
        header: decode_part(parts[0]),
        claims: decode_part(parts[1]),
        signed: format!("{}.{}", parts[0], parts[1]),
        signature: URL_SAFE_NO_PAD.decode(parts[2]).expect("the signature is base64url"),
    }
}

async fn jwks(server: &TestServer) -> Value {
    let response = server.client.get(format!("{}/.well-known/jwks.json", server.url)).send().await.unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

/// The key of `jwks` whose `kid` is `kid`, checked to be an Ed25519 signing key.
fn verifying_key(jwks: &Value, kid: &str) -> VerifyingKey {
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("no key {kid} in {jwks}"));
    assert_eq!((&key["kty"], &key["crv"]), (&json!("OKP"), &json!("Ed25519")), "{key}");
    assert!(key.get("d").is_none(), "the JWKS must not publish the private key: {key}");
    let x: [u8; 32] = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().try_into().expect("32 bytes");
    VerifyingKey::from_bytes(&x).expect("a valid Ed25519 public key")
}

/// Verifies `token` against the published keys; answers its decoded parts.
fn verify(jwks: &Value, token: &str) -> Result<Jwt, String> {
    let jwt = parse_jwt(token);
    let kid = jwt.header["kid"].as_str().ok_or("no kid")?;
    let key = verifying_key(jwks, kid);
    let signature = Signature::from_slice(&jwt.signature).map_err(|e| e.to_string())?;
    key.verify_strict(jwt.signed.as_bytes(), &signature).map_err(|e| e.to_string())?;
    Ok(jwt)
}

fn unix_millis(text: &Value) -> i64 {
    let parsed = OffsetDateTime::parse(text.as_str().unwrap(), &Rfc3339).unwrap();
    (parsed.unix_timestamp_nanos() / 1_000_000) as i64
}

async fn create(server: &TestServer, body: &Value) -> Value {
    let (status, session) = status_and_json(server.put_session(Uuid::new_v4(), body).await).await;
    assert_eq!(status, 201, "{session}");
    session
}

#[tokio::test]
async fn a_token_verifies_with_the_published_key_and_carries_the_documented_claims() {
    let server = TestServer::start().await;
    let session = create(&server, &new_transaction_intent()).await;
    let keys = jwks(&server).await;
    let jwt = verify(&keys, session["token"].as_str().unwrap()).expect("the signature verifies");

    assert_eq!(jwt.header["alg"], "EdDSA");
    assert!(jwt.header["kid"].is_string());
    let claims = &jwt.claims;
    assert_eq!(claims["iss"], server.url);
    assert_eq!(claims["aud"], format!("{}/pay", server.url));
    assert_eq!(claims["sid"], session["id"]);
    assert_eq!(claims["merchId"], server.merchant_id.to_string());
    assert!(claims.get("custId").is_none(), "no customer, no custId: {claims}");
    assert_eq!(claims["auth"], "otp");
    let created = unix_millis(&session["createdOn"]);
    let expires = unix_millis(&session["expiresOn"]);
    assert_eq!(claims["iat"], json!(created.div_euclid(1000)));
    assert_eq!(claims["exp"], json!((expires + 999).div_euclid(1000)), "exp is expiresOn rounded up to seconds");
    assert_eq!(session["redirectUrl"], format!("{}/pay", server.url));
    server.stop().await;
}

#[tokio::test]
async fn a_token_carries_the_customer_when_the_session_has_one() {
    let server = TestServer::start().await;
    let customer = server.customer().await;
    let mut body = new_transaction_intent();
    body["customerId"] = json!(customer);
    let session = create(&server, &body).await;
    assert_eq!(session["customerId"], customer.to_string());
    let jwt = verify(&jwks(&server).await, session["token"].as_str().unwrap()).expect("the signature verifies");
    assert_eq!(jwt.claims["custId"], customer.to_string());
    assert_eq!(jwt.claims["sid"], session["id"]);
    server.stop().await;
}

#[tokio::test]
async fn a_tampered_token_does_not_verify() {
    let server = TestServer::start().await;
    let session = create(&server, &new_transaction_intent()).await;
    let keys = jwks(&server).await;
    let token = session["token"].as_str().unwrap();
    let jwt = parse_jwt(token);
    let mut claims = jwt.claims.clone();
    claims["sid"] = json!(Uuid::new_v4());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    assert!(verify(&keys, &forged).is_err(), "a changed payload must not verify");
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_put_and_a_read_return_the_same_token() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let (status, first) = status_and_json(server.put_session(id, &new_transaction_intent()).await).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = status_and_json(server.put_session(id, &new_transaction_intent()).await).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["token"], first["token"]);
    let (_, read) = status_and_json(server.get_session(id).await).await;
    assert_eq!(read["token"], first["token"]);
    let listed = server.request(Method::GET, &format!("{BASE}/redirect-sessions")).send().await.unwrap();
    let (_, page) = status_and_json(listed).await;
    assert_eq!(page["items"][0]["token"], first["token"]);
    server.stop().await;
}

#[tokio::test]
async fn after_a_key_rotation_and_a_restart_the_jwks_lists_both_keys_and_old_tokens_still_verify() {
    let server = TestServer::start().await;
    let old = create(&server, &new_transaction_intent()).await;
    let old_token = old["token"].as_str().unwrap().to_owned();
    let old_kid = parse_jwt(&old_token).header["kid"].as_str().unwrap().to_owned();
    assert_eq!(kids(&jwks(&server).await), std::slice::from_ref(&old_kid));
    let rotated = redirect_sessions::admin::rotate_signing_key(server.store()).await.expect("rotated");
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    let api_key = server.api_key.clone();
    let database = server.stop_keeping_database().await;

    let restarted = TestServer::start_on(test_config(&database), database).await;
    let keys = jwks(&restarted).await;
    let mut listed = kids(&keys);
    listed.sort();
    let mut expected = vec![old_kid.clone(), new_kid.clone()];
    expected.sort();
    assert_eq!(listed, expected, "the current and the previous key: {keys}");
    assert_eq!(kids(&keys)[0], new_kid, "the current key first");
    verify(&keys, &old_token).expect("a token of the previous key still verifies");

    // New tokens are signed with the new key; the old session still answers its old token.
    let fresh = create(&restarted, &new_transaction_intent()).await;
    let jwt = verify(&keys, fresh["token"].as_str().unwrap()).expect("a new token verifies");
    assert_eq!(jwt.header["kid"], new_kid);
    let id: Uuid = old["id"].as_str().unwrap().parse().unwrap();
    let read = restarted.client.get(format!("{}{BASE}/redirect-sessions/{id}", restarted.url));
    let (status, read) = status_and_json(read.header("x-api-key", &api_key).send().await.unwrap()).await;
    assert_eq!((status, &read["token"]), (200, &json!(old_token)));
    restarted.stop().await;
}

#[tokio::test]
async fn a_running_instance_signs_with_a_rotated_key_once_it_reloads_and_publishes_at_most_ten_previous_keys() {
    let server = TestServer::start().await;
    let response = server.client.get(format!("{}/.well-known/jwks.json", server.url)).send().await.unwrap();
    assert_eq!(response.headers()["cache-control"], "public, max-age=300");
    let first = kids(&jwks(&server).await);
    let rotate = || async { redirect_sessions::admin::rotate_signing_key(server.store()).await.expect("rotated") };
    let new_kid = rotate().await["kid"].as_str().unwrap().to_owned();
    assert_eq!(kids(&jwks(&server).await), first, "a running instance reads the keys when it reloads them");

    // What the reload job (every 30 s) does.
    redirect_sessions::state::reload_keys_now(&server.state).await.expect("the keys load");
    let keys = jwks(&server).await;
    assert_eq!(kids(&keys), [new_kid.clone(), first[0].clone()], "the new key first, the old one still accepted");
    let fresh = create(&server, &new_transaction_intent()).await;
    assert_eq!(verify(&keys, fresh["token"].as_str().unwrap()).expect("verifies").header["kid"], new_kid);

    // Eleven rotations later the first two keys have dropped out: the current one and the ten
    // retired last are published (rotations a few milliseconds apart, so that "last" is clear;
    // real ones are hours apart).
    let mut newest = Vec::new();
    for _ in 0..11 {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        newest.push(rotate().await["kid"].as_str().unwrap().to_owned());
    }
    redirect_sessions::state::reload_keys_now(&server.state).await.expect("the keys load");
    let listed = kids(&jwks(&server).await);
    assert_eq!(listed.len(), 11, "{listed:?}");
    assert_eq!(listed[0], newest[10], "the current key first");
    let mut expected = newest.clone();
    expected.reverse();
    assert_eq!(listed, expected, "the newest first; {} and {new_kid} are no longer published", first[0]);
    server.stop().await;
}
