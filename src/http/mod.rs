//! The read-only status page (`/`) and Prometheus metrics (`/metrics`) that `serve` offers on
//! a local HTTP port: hyper on the daemon's tokio runtime, GET only, bounded connections.
//!
//! Renders what [`crate::node::health`] gathers; it changes nothing, serves no file and runs
//! no script. Every text from a peer or a user is escaped (see [`page`]).

pub mod metrics;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::node::health::Counters;
use crate::node::Node;

/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS_MAX: usize = 16;
/// A client must send its request headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, whatever it is doing (a slow reader cannot hold a slot).
const CONNECTION_TIME_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot serve the status page on {addr}: {source}; choose another address with --http or http.listen, or \"\" to turn it off")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the page's address (within the tokio runtime that will serve it).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    let bind = || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    };
    bind().map_err(|source| HttpError::Bind { addr, source })
}

/// Serves the page and the metrics of the node in `dir` until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    dir: PathBuf,
    counters: Counters,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "status page and /metrics");
        eprintln!("communesync status page on http://{addr}/");
    }
    let dir = Arc::new(dir);
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                warn!("status page: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (dir, counters) = (dir.clone(), counters.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (dir, counters) = (dir.clone(), counters.clone());
                async move { Ok::<_, Infallible>(respond(req, dir, counters).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME_MAX, connection).await;
            drop(slot);
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    dir: Arc<PathBuf>,
    counters: Counters,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only: only GET\n".into(),
        );
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    // Store reads block: off the async workers.
    let rendered =
        tokio::task::spawn_blocking(move || render(&dir, &path, query.as_deref(), &counters)).await;
    match rendered {
        Ok(Ok((content_type, body))) => Response::builder()
            .header("content-type", content_type)
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "bad response\n".into())),
        Ok(Err((status, message))) => text(status, message),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("page failed: {e}\n"),
        ),
    }
}

type Rendered = Result<(&'static str, String), (StatusCode, String)>;

fn render(dir: &std::path::Path, path: &str, query: Option<&str>, counters: &Counters) -> Rendered {
    let failed = |e: crate::node::NodeError| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot read the node: {}\n",
                crate::cli::safe(&format!("{e:#}"))
            ),
        )
    };
    match path {
        "/" => {
            let mut node = Node::open(dir).map_err(failed)?;
            let html = page::render(&mut node, query).map_err(failed)?;
            Ok(("text/html; charset=utf-8", html))
        }
        "/metrics" => {
            let node = Node::open(dir).map_err(failed)?;
            let body = metrics::render(&node, &counters.values()).map_err(failed)?;
            Ok(("text/plain; version=0.0.4; charset=utf-8", body))
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            "not found: the page is / and the metrics /metrics\n".into(),
        )),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
