//! Loopback probes for health checks, with std only: TCP connect, a minimal HTTP/1.1 GET,
//! the Redis PING and Kafka's ApiVersions request.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Health answers are small; a bigger one is not an answer we understand.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn connect(port: u16) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&loopback(port), PROBE_TIMEOUT)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    Ok(stream)
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&loopback(port), Duration::from_millis(300)).is_ok()
}

/// `GET http://127.0.0.1:<port><path>`; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_get_with(port, path, &[])
}

/// `GET http://127.0.0.1:<port><path>` with extra `headers`; returns (status, body).
pub fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let mut stream = connect(port)?;
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.take(RESPONSE_BYTES_MAX).read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response from :{port}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Succeeds when `GET path` answers 200.
pub fn http_ok(port: u16, path: &str) -> Result<()> {
    let (status, _) = http_get(port, path)?;
    if status != 200 {
        bail!("GET :{port}{path} answered {status}");
    }
    Ok(())
}

/// Redis `PING` → `+PONG`.
pub fn redis_ping(port: u16) -> Result<()> {
    let mut stream = connect(port)?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if !reply.starts_with("+PONG") {
        bail!("redis answered {reply:?} to PING");
    }
    Ok(())
}

/// Kafka `ApiVersions` v0: the broker answers with error code 0 once its request plane is up.
pub fn kafka_api_versions(port: u16) -> Result<()> {
    const API_VERSIONS: i16 = 18;
    const CORRELATION_ID: i32 = 0x5ec0_0001;
    let client_id = b"xtask";
    let mut request = Vec::new();
    request.extend_from_slice(&API_VERSIONS.to_be_bytes());
    request.extend_from_slice(&0i16.to_be_bytes());
    request.extend_from_slice(&CORRELATION_ID.to_be_bytes());
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    let mut stream = connect(port)?;
    stream.write_all(&(request.len() as i32).to_be_bytes())?;
    stream.write_all(&request)?;
    let mut header = [0u8; 10]; // size, correlation id, error code
    stream.read_exact(&mut header).context("reading the ApiVersions response")?;
    let correlation = i32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let error_code = i16::from_be_bytes([header[8], header[9]]);
    if correlation != CORRELATION_ID || error_code != 0 {
        bail!("kafka ApiVersions: correlation {correlation:#x}, error code {error_code}");
    }
    Ok(())
}
