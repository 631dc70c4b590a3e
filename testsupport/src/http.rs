//! A minimal blocking HTTP/1.1 GET for probing `/metrics`, `/healthz` and `/readyz` in tests,
//! the demo and the bench, without pulling an HTTP client into them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `None` when nothing answers or the reply is not HTTP.
pub fn get(addr: SocketAddr, path: &str) -> Option<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Some(Response {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// `(status, body)`, the common case.
pub fn get_status_body(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    get(addr, path).map(|r| (r.status, r.body))
}
