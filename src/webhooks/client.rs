//! The outbound webhook client: pooled HTTP/1.1 (and TLS), no redirects, no proxies, and a guard that refuses non-public addresses on the resolved address at connect time.

use std::{
    error::Error as StdError,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER},
    redirect, StatusCode, Url,
};
use tokio::time::Instant;

use crate::domain::address::is_public;

/// How much of a response body is read; the rest is dropped with the connection.
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// A receiver may not park a delivery for longer than this with Retry-After.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptResult {
    /// The HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// Why there was no acceptable response (connect error, refused address, timeout, redirect,
    /// non-2xx "HTTP 500"), None on success.
    pub error: Option<String>,
    /// Retry-After of a 429/503 answer, in seconds (delta-seconds form only), capped at 24h.
    pub retry_after: Option<Duration>,
    /// Wall time of the whole attempt, body read included.
    pub duration: Duration,
}

impl AttemptResult {
    /// Whether the receiver answered 2xx.
    pub fn is_success(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }
}

/// The error the guarded resolver fails with; found again in reqwest's error chain so the
/// attempt reports the refusal itself rather than a generic "dns error".
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Refused {}

/// Resolves like the system resolver, then drops every non-public address. Filtering (rather
/// than refusing a name with any non-public address) still delivers to hosts that publish a
/// stray private record, and is as safe: the connector only ever sees the addresses returned
/// here, so there is no second lookup for DNS rebinding to race. A name left with no address
/// is refused.
#[derive(Debug)]
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_public(name.as_str().to_owned()))
    }
}

async fn resolve_public(host: String) -> Result<Addrs, Box<dyn StdError + Send + Sync>> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
    if resolved.is_empty() {
        return Err(format!("{host} resolves to no address").into());
    }
    let public: Vec<SocketAddr> = resolved.into_iter().filter(|addr| is_public(addr.ip())).collect();
    if public.is_empty() {
        return Err(Refused(format!("refused: {host} resolves only to non-public addresses")).into());
    }
    Ok(Box::new(public.into_iter()))
}

/// A pooled client for webhook deliveries; cheap to clone (clones share the pool).
#[derive(Clone, Debug)]
pub struct WebhookClient {
    http: reqwest::Client,
    timeout: Duration,
    allow_private: bool,
}

impl WebhookClient {
    /// `timeout` bounds the whole attempt; `allow_private` switches the guard off (tests, private
    /// deployments). Keep-alive connections are reused, up to `max_idle_per_host` idle per host:
    /// set it to the dispatcher's concurrency, or a busy receiver sees a new connection (and a
    /// TLS handshake) for most attempts.
    pub fn new(timeout: Duration, allow_private: bool, max_idle_per_host: usize) -> std::io::Result<WebhookClient> {
        let mut builder = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .pool_max_idle_per_host(max_idle_per_host)
            .tcp_nodelay(true);
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let http = builder.build().map_err(std::io::Error::other)?;
        Ok(WebhookClient { http, timeout, allow_private })
    }

    /// POSTs `body` with `headers` to `url` and never follows redirects (a 3xx is a failure with
    /// error "redirect (HTTP 30x) not followed"). The response body is read and discarded, up to
    /// 64 KiB, within the timeout.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: Bytes) -> AttemptResult {
        let started = Instant::now();
        let (status, error, retry_after) = self.attempt(started + self.timeout, url, headers, body).await;
        AttemptResult { status, error, retry_after, duration: started.elapsed() }
    }

    async fn attempt(
        &self,
        deadline: Instant,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> (Option<u16>, Option<String>, Option<Duration>) {
        let fail = |error: String| (None, Some(error), None);
        let url = match Url::parse(url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            Ok(url) => return fail(format!("unsupported scheme {}", url.scheme())),
            Err(e) => return fail(format!("invalid url: {e}")),
        };
        // hyper connects to IP-literal hosts without asking the resolver, so they are checked here.
        if !self.allow_private {
            if let Some(ip) = literal_ip(&url).filter(|ip| !is_public(*ip)) {
                return fail(format!("refused: non-public address {ip}"));
            }
        }
        let mut header_map = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
                return fail(format!("invalid header name {name:?}"));
            };
            let Ok(header_value) = HeaderValue::from_str(value) else {
                return fail(format!("invalid value for header {name}"));
            };
            header_map.append(header_name, header_value);
        }

        // reqwest's own timeout covers the same span; the deadline here is what guarantees the
        // bound on the attempt as a whole.
        let send = self.http.post(url).headers(header_map).body(body).send();
        let response = match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return fail(self.describe(e)),
            Err(_) => return fail(self.timeout_error()),
        };
        let status = response.status();
        let retry_after = if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            parse_retry_after(response.headers().get(RETRY_AFTER))
        } else {
            None
        };
        // The status has decided the outcome: a receiver that acknowledged with 2xx and then
        // stalls its body has still acknowledged, and retrying would deliver twice.
        let _ = tokio::time::timeout_at(deadline, drain(response)).await;
        let error = if status.is_success() {
            None
        } else if status.is_redirection() {
            Some(format!("redirect (HTTP {}) not followed", status.as_u16()))
        } else {
            Some(format!("HTTP {}", status.as_u16()))
        };
        (Some(status.as_u16()), error, retry_after)
    }

    fn timeout_error(&self) -> String {
        format!("timeout after {}ms", self.timeout.as_millis())
    }

    /// A one-line reason without the URL, which may carry a merchant's token in its query.
    fn describe(&self, err: reqwest::Error) -> String {
        if let Some(refused) = find_source::<Refused>(&err) {
            return refused.0.clone();
        }
        if err.is_timeout() {
            return self.timeout_error();
        }
        let mut message = String::from(if err.is_connect() { "connect error" } else { "request error" });
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

/// Reads the body so that hyper can return the connection to the pool, but no more than
/// MAX_RESPONSE_BODY: a huge or endless body costs a new connection later, not memory or time now.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while read < MAX_RESPONSE_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
}

fn find_source<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(ip.into()),
        url::Host::Ipv6(ip) => Some(ip.into()),
        // The url crate already turns every IPv4 spelling into Host::Ipv4; parsing again makes sure
        // nothing that hyper would treat as a literal (and so never resolve) passes as a name.
        url::Host::Domain(name) => name.parse().ok(),
    }
}

fn parse_retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None; // the HTTP-date form is not worth a date parser here
    }
    // All digits but too long for u64 is still "very long", so it caps rather than vanishing.
    Some(text.parse().map_or(MAX_RETRY_AFTER, Duration::from_secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{
        http::{header, HeaderMap as Headers, StatusCode as Code},
        routing::{any, post},
        Router,
    };
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    };
    use tokio::net::TcpListener;

    #[test]
    fn retry_after_takes_delta_seconds_capped_at_a_day() {
        let parse = |v: &str| parse_retry_after(Some(&HeaderValue::from_str(v).unwrap()));
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse("-1"), None);
        assert_eq!(parse_retry_after(None), None);
    }

    #[derive(Clone, Default)]
    struct Seen {
        request: Arc<Mutex<Option<(String, Bytes)>>>,
        landings: Arc<AtomicUsize>,
    }

    async fn receiver() -> (String, Seen) {
        let seen = Seen::default();
        let (on_ok, on_landing) = (seen.clone(), seen.clone());
        let app = Router::new()
            .route(
                "/ok",
                post(move |headers: Headers, body: Bytes| async move {
                    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    *on_ok.request.lock().unwrap() = Some((id.to_owned(), body));
                    Code::NO_CONTENT
                }),
            )
            .route("/fail", post(|| async { Code::INTERNAL_SERVER_ERROR }))
            .route("/busy", post(|| async { (Code::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "7")]) }))
            .route("/moved", post(|| async { (Code::FOUND, [(header::LOCATION, "/landing")]) }))
            .route(
                "/landing",
                any(move || async move {
                    on_landing.landings.fetch_add(1, Ordering::SeqCst);
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, seen)
    }

    fn open_client() -> WebhookClient {
        WebhookClient::new(Duration::from_secs(5), true, 8).unwrap()
    }

    #[tokio::test]
    async fn a_2xx_is_success_and_carries_headers_and_body() {
        let (base, seen) = receiver().await;
        let headers = [("webhook-id", "evt_1".to_owned()), ("content-type", "application/json".to_owned())];
        let result = open_client().post(&format!("{base}/ok"), &headers, Bytes::from_static(b"{}")).await;
        assert_eq!((result.status, result.error.as_deref(), result.retry_after), (Some(204), None, None));
        assert!(result.is_success());
        assert_eq!(seen.request.lock().unwrap().clone(), Some(("evt_1".to_owned(), Bytes::from_static(b"{}"))));
    }

    #[tokio::test]
    async fn non_2xx_answers_are_failures() {
        let (base, seen) = receiver().await;
        let client = open_client();
        let failed = client.post(&format!("{base}/fail"), &[], Bytes::new()).await;
        assert_eq!((failed.status, failed.error.as_deref(), failed.retry_after), (Some(500), Some("HTTP 500"), None));
        assert!(!failed.is_success());

        let busy = client.post(&format!("{base}/busy"), &[], Bytes::new()).await;
        assert_eq!((busy.status, busy.retry_after), (Some(503), Some(Duration::from_secs(7))));
        assert!(!busy.is_success());

        let moved = client.post(&format!("{base}/moved"), &[], Bytes::new()).await;
        assert_eq!((moved.status, moved.error.as_deref()), (Some(302), Some("redirect (HTTP 302) not followed")));
        assert!(!moved.is_success());
        assert_eq!(seen.landings.load(Ordering::SeqCst), 0, "the redirect was followed");

        let invalid = client.post(&format!("{base}/ok"), &[("bad header", String::new())], Bytes::new()).await;
        assert_eq!(invalid.error.as_deref(), Some("invalid header name \"bad header\""));
    }

    #[tokio::test]
    async fn a_silent_receiver_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let client = WebhookClient::new(Duration::from_millis(200), true, 8).unwrap();
        let result = client.post(&url, &[], Bytes::from_static(b"{}")).await;
        holder.abort();
        assert_eq!((result.status, result.error.as_deref()), (None, Some("timeout after 200ms")));
    }

    /// How long a wait may take before a test fails as hung: a safety net for an event that
    /// never comes, never a bound on how fast it comes.
    const HANG_GUARD: Duration = Duration::from_secs(120);

    #[tokio::test]
    async fn an_endless_body_is_cut_off_without_failing_the_attempt() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let sender = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket.read(&mut [0u8; 4096]).await;
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
            let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        // The attempt's own timeout is an hour: a client that read the body to its deadline
        // would never come back within the hang guard, so coming back at all is the cut-off.
        let client = WebhookClient::new(Duration::from_secs(3600), true, 8).unwrap();
        let result = tokio::time::timeout(HANG_GUARD, client.post(&url, &[], Bytes::new()))
            .await
            .expect("the attempt kept reading the endless body instead of cutting it off");
        assert_eq!((result.status, result.error.as_deref()), (Some(200), None));
        // And the connection was dropped rather than kept for reuse: the sender's writes fail.
        tokio::time::timeout(HANG_GUARD, sender)
            .await
            .expect("the connection of the cut-off body stayed open")
            .expect("the sender ends");
    }

    #[tokio::test]
    async fn the_guard_refuses_loopback_without_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let guarded = WebhookClient::new(Duration::from_secs(5), false, 8).unwrap();
        let refused = |what: &str| format!("refused: {what}");
        let cases = [
            (format!("http://127.0.0.1:{port}/"), refused("non-public address 127.0.0.1")),
            (format!("https://[::1]:{port}/"), refused("non-public address ::1")),
            (format!("http://[::ffff:127.0.0.1]:{port}/"), refused("non-public address ::ffff:127.0.0.1")),
            (format!("http://2130706433:{port}/"), refused("non-public address 127.0.0.1")),
            (format!("http://localhost:{port}/"), refused("localhost resolves only to non-public addresses")),
            (format!("ftp://127.0.0.1:{port}/"), "unsupported scheme ftp".to_owned()),
        ];
        for (url, expected) in cases {
            let result = guarded.post(&url, &[], Bytes::new()).await;
            assert_eq!((result.status, result.error), (None, Some(expected)), "{url}");
        }
        // Connections are accepted in the order they were made: when the first one is a marker
        // made only now, the guarded client made none.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut marker = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        marker.write_all(b"marker").await.unwrap();
        let (mut first, _) = tokio::time::timeout(HANG_GUARD, listener.accept()).await.expect("accepts").unwrap();
        let mut sent = [0u8; 6];
        let read = tokio::time::timeout(HANG_GUARD, first.read_exact(&mut sent)).await.expect("reads");
        read.unwrap_or_else(|e| panic!("the first connection was not the marker ({e}): the guarded client connected"));
        assert_eq!(&sent, b"marker", "the receiver got a connection from the guarded client");
    }
}
