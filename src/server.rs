//! The HTTP/1 listeners: an accept loop with a connection limit, hyper connections with a header
//! read timeout, request bodies with a deadline, and a graceful shutdown (docs/OPERATIONS.md
//! "Slow and greedy clients").
//!
//! `axum::serve` offers none of these knobs, so this does what it does — accept, serve the
//! router on each connection with `ConnectInfo<SocketAddr>`, on shutdown stop accepting and let
//! every connection finish its request in flight — plus the limits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request};
use axum::response::Response;
use axum::Router;
use futures_util::future::Either;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use uuid::Uuid;

use crate::config::Config;
use crate::error::{ApiError, ErrorCode};

/// How long the accept loop pauses after an accept error that is not about one connection
/// (e.g. `EMFILE`: out of file descriptors), as `axum::serve` does.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// At most one "connection limit reached" warning per this interval.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What a listener allows its clients (settings `http_header_timeout`, `http_body_timeout`,
/// `http_max_connections`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From the connection's start (or the end of the previous response) until the request's
    /// headers are complete; then the connection is closed without an answer.
    pub header_timeout: Duration,
    /// From the headers until the whole body has arrived; then `408` and the connection is closed.
    pub body_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

impl Limits {
    pub fn of(config: &Config) -> Limits {
        Limits {
            header_timeout: config.http_header_timeout,
            body_timeout: config.http_body_timeout,
            max_connections: config.http_max_connections,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then closes the listener, lets
/// every connection finish the request it is serving (idle keep-alive connections close at once)
/// and returns when all are closed.
///
/// A connection is accepted only with one of `max_connections` permits in hand: beyond the
/// limit, clients wait in the kernel's listen backlog (and are served when a connection closes),
/// and no task, buffer or timer is spent on them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    public_url: Arc<str>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    // Every connection holds a receiver: `closing` tells them to finish, and `closed()` on the
    // sender resolves once the last of them is gone.
    let (closing, closing_seen) = watch::channel(false);
    let mut warned_at: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if warned_at.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let service = Handler {
                    router: TowerToHyperService::new(router.clone()),
                    peer,
                    limits,
                    public_url: public_url.clone(),
                };
                tokio::spawn(connection(stream, builder.clone(), service, permit, closing_seen.clone()));
            }
            // The client gave up before it was accepted: nothing to do.
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                tracing::error!(%error, "accept error; pausing");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    drop(listener);
    drop(closing_seen);
    let _ = closing.send(true);
    closing.closed().await;
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Serves one connection until it closes, or until `closing`, then finishes gracefully: the
/// request in flight is answered, and the connection is closed instead of kept alive.
async fn connection(
    stream: TcpStream,
    builder: Arc<http1::Builder>,
    service: Handler,
    _permit: OwnedSemaphorePermit,
    mut closing: watch::Receiver<bool>,
) {
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // (`wait_for`'s guard must not live across the await below.)
        () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // Header timeouts, resets and malformed requests end up here; hyper already answered what
    // deserves an answer.
    if let Err(error) = result {
        tracing::trace!(%error, "connection ended with an error");
    }
}

/// The router as a hyper service for one connection: adds `ConnectInfo<SocketAddr>` (as
/// `into_make_service_with_connect_info::<SocketAddr>()` does) and puts a deadline on the body.
#[derive(Clone)]
struct Handler {
    router: TowerToHyperService<Router>,
    peer: SocketAddr,
    limits: Limits,
    /// For the `moreInfo` link of the `408` error body.
    public_url: Arc<str>,
}

type Answer = Result<Response, Infallible>;

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        TowerToHyperServiceFuture<Router, Request<Body>>,
        Pin<Box<dyn Future<Output = Answer> + Send + 'static>>,
    >;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(ConnectInfo(self.peer));
        if body.is_end_stream() {
            // No body to wait for (GET, or `content-length: 0`).
            return Either::Left(self.router.call(Request::from_parts(parts, Body::new(body))));
        }
        let (timed_out, timeout_seen) = oneshot::channel();
        let body = DeadlineBody {
            inner: body,
            deadline: Instant::now() + self.limits.body_timeout,
            sleep: None,
            timed_out: Some(timed_out),
        };
        let answer = self.router.call(Request::from_parts(parts, Body::new(body)));
        let public_url = self.public_url.clone();
        Either::Right(Box::pin(async move {
            tokio::select! {
                biased;
                // The body missed its deadline while the handler waited for it: the handler (which
                // has changed nothing yet: every handler reads its whole body first) is dropped.
                Ok(()) = timeout_seen => Ok(body_timed_out(&public_url)),
                answer = answer => answer,
            }
        }))
    }
}

/// `408 RequestTimeout` with the error body every error answer has, and the connection is closed
/// after it (the rest of the body is not read).
fn body_timed_out(public_url: &str) -> Response {
    tracing::debug!("a request body did not arrive within http_body_timeout; closing the connection");
    let error = ApiError::new(ErrorCode::RequestTimeout, "The request body did not arrive in time.");
    let mut response = error.render(Uuid::now_v7(), public_url);
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body that must arrive completely by `deadline`. Past it, it says so on `timed_out`
/// and never yields again (the request's future is dropped in favour of `408`). Data that has
/// arrived is always handed out first, so a body that is already there never times out.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    /// Created on the first wait, so a body that never makes the handler wait costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Option<oneshot::Sender<()>>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            if let Some(sender) = this.timed_out.take() {
                let _ = sender.send(());
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
