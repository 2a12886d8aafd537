//! Raw HTTP/1.1 over a TCP stream, for the tests that check what a client sees on the
//! wire (a stop, the connection cap): one answer read whole, an exchange, a close.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for anything the server should do at once.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// One answer as the client read it.
#[derive(Debug)]
pub struct Answer {
    pub status_line: String,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn assert_ok(&self) {
        assert!(self.status_line.starts_with("HTTP/1.1 200"), "{self:?}");
    }

    pub fn says_close(&self) -> bool {
        self.headers
            .iter()
            .any(|(name, value)| name == "connection" && value.eq_ignore_ascii_case("close"))
    }
}

/// Reads one whole answer (head and a `Content-Length` body) off `stream`.
pub async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(head_end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse::<usize>().ok())
                .expect("a content-length");
            let body_start = head_end + 4;
            if bytes.len() >= body_start + length {
                let body = String::from_utf8_lossy(&bytes[body_start..body_start + length]);
                return Answer {
                    status_line,
                    headers,
                    body: body.into_owned(),
                };
            }
        }
        let read = tokio::time::timeout(PROMPTLY, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("the connection was not reset");
        assert!(
            read > 0,
            "the connection closed before a whole answer: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&chunk[..read]);
    }
}

/// Sends `request` and reads its answer.
pub async fn exchange(stream: &mut TcpStream, request: &str) -> Answer {
    stream.write_all(request.as_bytes()).await.expect("write");
    read_answer(stream).await
}

/// Waits for the server to close `stream`: a read that returns nothing, or a reset.
pub async fn closed_by_server(stream: &mut TcpStream) {
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(PROMPTLY, stream.read(&mut rest))
        .await
        .expect("the server closed the connection in time");
    assert!(
        matches!(read, Ok(0)),
        "the connection ended cleanly, with nothing more to read: {read:?}"
    );
}

/// Asserts that nothing comes back on `stream` for `within` (its request not answered,
/// the connection not closed); `what` names the wait in a failure.
pub async fn assert_unanswered(stream: &mut TcpStream, within: Duration, what: &str) {
    let mut nothing = [0u8; 1];
    assert!(
        tokio::time::timeout(within, stream.read(&mut nothing))
            .await
            .is_err(),
        "{what}"
    );
}
