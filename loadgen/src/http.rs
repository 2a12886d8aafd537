//! A lean HTTP/1.1 client: one keep-alive connection per worker (like `wrk`), built on
//! hyper's connection API so the client costs as little CPU as possible on a 2-core box.
//!
//! Only loopback targets are accepted: this tool never loads anything but this machine.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One open HTTP/1.1 connection.
pub type Sender = SendRequest<Full<Bytes>>;

/// Where requests go: a loopback `http://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` to connect to.
    pub address: String,
    host_header: HeaderValue,
}

impl Target {
    /// Parses `http://127.0.0.1:8080` (a path, if any, is ignored); refuses anything
    /// that is not loopback.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("not a URL: {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported: {url}");
        }
        let host = uri.host().with_context(|| format!("no host in {url}"))?;
        let port = uri.port_u16().unwrap_or(80);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if !is_loopback(bare) {
            bail!(
                "{url}: only loopback addresses (127.0.0.0/8, ::1, localhost) may be load-tested"
            );
        }
        let address = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        let host_header = HeaderValue::from_str(&address)
            .with_context(|| format!("{url}: host is not a valid header value"))?;
        Ok(Self {
            address,
            host_header,
        })
    }

    /// A request with the `Host` header set; a body makes it JSON.
    pub fn request(&self, method: Method, path: &str, body: Option<Bytes>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body.clone().unwrap_or_default()));
        *request.method_mut() = method;
        // Paths are built by this program from checked parts; a bad one becomes "/".
        *request.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        let headers = request.headers_mut();
        headers.insert(HOST, self.host_header.clone());
        if body.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request
    }
}

/// True for `localhost`, 127.0.0.0/8 and ::1.
pub fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Opens one keep-alive connection (TCP_NODELAY) and drives it in the background.
pub async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target.address))
        .await
        .with_context(|| format!("connecting to {} timed out", target.address))?
        .with_context(|| format!("connecting to {}", target.address))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer.
pub async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    sender.ready().await.context("connection not usable")?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// How long a pooled connection may sit idle before it is dropped rather than reused:
/// well under the services' `http.header_read_timeout_ms` (10 s), which closes an idle
/// kept-alive connection. A request sent just as the server closes the connection
/// fails unanswered, and the probe counts an `io_error` that a real client would have
/// sent again (most likely the 19 of ~60,000 POSTs in one 20 s e2e run of
/// `scripts/ab`, where the pool had grown in a slow spell and sat idle after it).
const IDLE_MAX: Duration = Duration::from_secs(5);

/// A small pool of keep-alive connections for tasks that come and go (the e2e probe).
#[derive(Debug)]
pub struct Pool {
    target: Target,
    /// Idle connections, the most recently used last, with when they went idle.
    idle: Mutex<Vec<(Sender, Instant)>>,
    max_idle: usize,
}

impl Pool {
    pub fn new(target: Target, max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            target,
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends on an idle connection (or a new one); a connection that worked goes back.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)> {
        let idle = self.idle.lock().ok().and_then(|mut idle| {
            // The ones below the most recent are older still: a stale one means all are.
            let (sender, since) = idle.pop()?;
            if since.elapsed() > IDLE_MAX {
                idle.clear();
                return None;
            }
            Some(sender)
        });
        let mut sender = match idle {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(&self.target).await?,
        };
        let answer = exchange(&mut sender, request).await?;
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push((sender, Instant::now()));
            }
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_parse() {
        let target = Target::parse("http://127.0.0.1:18080").expect("loopback");
        assert_eq!(target.address, "127.0.0.1:18080");
        let target = Target::parse("http://localhost:8081/v1").expect("localhost");
        assert_eq!(target.address, "localhost:8081");
        let target = Target::parse("http://[::1]:9000").expect("v6 loopback");
        assert_eq!(target.address, "[::1]:9000");
    }

    #[test]
    fn anything_but_loopback_is_refused() {
        assert!(Target::parse("http://10.0.0.1:8080").is_err());
        assert!(Target::parse("http://example.com").is_err());
        assert!(Target::parse("https://127.0.0.1:8080").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
    }

    #[test]
    fn requests_carry_host_and_content_type() {
        let target = Target::parse("http://127.0.0.1:1").expect("loopback");
        let request = target.request(Method::POST, "/v1/telemetry", Some(Bytes::from("{}")));
        assert_eq!(request.headers()[HOST], "127.0.0.1:1");
        assert_eq!(request.headers()[CONTENT_TYPE], "application/json");
        let request = target.request(Method::GET, "/v1/devices/x/stats", None);
        assert!(request.headers().get(CONTENT_TYPE).is_none());
        assert_eq!(request.uri().path(), "/v1/devices/x/stats");
    }
}
