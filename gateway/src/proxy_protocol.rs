//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4 balancer writes at
//! the start of a connection to say which client it carries.
//!
//! Read before HTTP starts, on listeners with `proxy_protocol: true`. The reader takes
//! exactly the header's bytes from the socket (never more), so what follows goes to the
//! HTTP server untouched and the stream keeps its plain type (TLS or not). Hand-written
//! rather than the `ppp` crate: the parsing is ~100 lines, and the part that needs care is
//! reading no byte past the header, which a buffer-based parser leaves to the caller.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, `\r\n` included (spec §2.1).
const V1_MAX: usize = 107;
/// The shortest header of either version: `PROXY UNKNOWN\r\n` (v2 needs 16).
const MIN_HEADER: usize = 15;
/// The longest version 2 address block accepted (TLVs included). The spec allows 64 KiB;
/// balancers send a few hundred bytes at most (AWS adds a VPC endpoint id).
pub const V2_MAX_BLOCK: usize = 2048;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing complete within the time allowed.
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The connection broke or ended first.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    /// The first bytes are neither `PROXY ` nor the version 2 signature.
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    /// A header that breaks the spec.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Reads one PROXY header from `stream` within `timeout`, consuming exactly its bytes.
/// `Some(address)`: the client the balancer speaks for; `None`: the header carries no
/// address (v1 `UNKNOWN`, v2 `LOCAL` or a non-IP family): use the socket's peer.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> Result<Option<SocketAddr>, Error> {
    match tokio::time::timeout(timeout, read(stream)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<SocketAddr>, Error> {
    let mut buf = Vec::with_capacity(V1_MAX);
    buf.resize(MIN_HEADER, 0);
    stream.read_exact(&mut buf).await?;
    if buf[..12] == V2_SIGNATURE {
        buf.resize(16, 0);
        stream.read_exact(&mut buf[MIN_HEADER..]).await?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > V2_MAX_BLOCK {
            return Err(Error::Malformed("version 2 address block longer than 2048 bytes"));
        }
        let mut block = vec![0; len];
        stream.read_exact(&mut block).await?;
        return parse_v2(buf[12], buf[13], &block);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(Error::Missing);
    }
    // Read no further than the line can still need, so no byte of the request after it
    // is taken: a few reads per header instead of one per byte.
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let need = v1_min_remaining(&buf);
        if buf.len() + need > V1_MAX {
            return Err(Error::Malformed("version 1 line longer than 107 bytes"));
        }
        let at = buf.len();
        buf.resize(at + need, 0);
        stream.read_exact(&mut buf[at..]).await?;
    }
    // A valid line is never read past its end; a shorter, invalid one may be.
    if !buf.ends_with(b"\r\n") {
        return Err(Error::Malformed("version 1 line has too few fields"));
    }
    parse_v1(&buf)
}

/// The fewest bytes that can still end the version 1 line `buf` (which has no `\r\n` yet).
fn v1_min_remaining(buf: &[u8]) -> usize {
    if buf.ends_with(b"\r") {
        return 1;
    }
    let line = &buf[b"PROXY ".len()..];
    let spaces = line.iter().filter(|&&b| b == b' ').count();
    let tcp = line.starts_with(b"TCP4 ") || line.starts_with(b"TCP6 ");
    if !tcp || spaces == 0 {
        return 2;
    }
    // `TCP4 src dst sport dport\r\n`: four fields after the protocol, three more spaces.
    let current_empty = line.ends_with(b" ");
    let fields_to_start = 4usize.saturating_sub(spaces);
    usize::from(current_empty) + fields_to_start * 2 + 2
}

/// `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n` (or `TCP6`, or `UNKNOWN ...`).
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, Error> {
    let text = std::str::from_utf8(line).map_err(|_| Error::Malformed("version 1 line is not ASCII"))?;
    let text = text.strip_suffix("\r\n").ok_or(Error::Malformed("version 1 line does not end in CRLF"))?;
    let mut fields = text.split(' ');
    let _proxy = fields.next();
    let family = fields.next().ok_or(Error::Malformed("version 1 line has no protocol"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(Error::Malformed("version 1 line needs source, destination and two ports"));
    };
    let ip: IpAddr = match family {
        "TCP4" => IpAddr::V4(src.parse().map_err(|_| Error::Malformed("bad IPv4 source address"))?),
        "TCP6" => IpAddr::V6(src.parse().map_err(|_| Error::Malformed("bad IPv6 source address"))?),
        _ => return Err(Error::Malformed("version 1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    if dst.parse::<IpAddr>().map(|d| d.is_ipv4() != ip.is_ipv4()).unwrap_or(true) {
        return Err(Error::Malformed("bad destination address"));
    }
    let port = |p: &str| p.parse::<u16>().ok().filter(|_| !p.starts_with('0') || p == "0");
    let (Some(sport), Some(_)) = (port(sport), port(dport)) else {
        return Err(Error::Malformed("bad port"));
    };
    Ok(Some(SocketAddr::new(ip, sport)))
}

/// Version 2: `ver_cmd` (0x20 LOCAL, 0x21 PROXY), `family` (0x11 TCP4, 0x21 TCP6, ...),
/// then the address block.
fn parse_v2(ver_cmd: u8, family: u8, block: &[u8]) -> Result<Option<SocketAddr>, Error> {
    if ver_cmd >> 4 != 2 {
        return Err(Error::Malformed("version 2 signature with another version"));
    }
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (e.g. a health check): the socket's peer.
        0 => return Ok(None),
        1 => {}
        _ => return Err(Error::Malformed("version 2 command is neither LOCAL nor PROXY")),
    }
    match family {
        // TCP or UDP over IPv4: src(4) dst(4) sport(2) dport(2).
        0x11 | 0x12 => {
            let a = block.get(..12).ok_or(Error::Malformed("IPv4 address block too short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]]))))
        }
        // TCP or UDP over IPv6: src(16) dst(16) sport(2) dport(2).
        0x21 | 0x22 => {
            let a = block.get(..36).ok_or(Error::Malformed("IPv6 address block too short"))?;
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&a[..16]).expect("16 bytes"));
            Ok(Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([a[32], a[33]]))))
        }
        // UNSPEC, or UNIX sockets: no IP address to use.
        0x00 | 0x31 | 0x32 => Ok(None),
        _ => Err(Error::Malformed("unknown version 2 address family")),
    }
}

/// The bytes of a version 2 header for `src` → `dst` (tests, and a client that needs one).
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a header from `bytes` and returns it with what is left for HTTP.
    fn read_all(bytes: &[u8]) -> (Result<Option<SocketAddr>, Error>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut cursor = std::io::Cursor::new(bytes.to_vec());
            let got = read_header(&mut cursor, Duration::from_secs(1)).await;
            let at = cursor.position() as usize;
            (got, bytes[at..].to_vec())
        })
    }

    #[test]
    fn version_1_gives_the_source_and_leaves_the_request() {
        let (got, rest) = read_all(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(got.unwrap(), Some("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
        let (got, rest) = read_all(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 80\r\nX");
        assert_eq!(got.unwrap(), Some("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(rest, b"X");
        // The shortest header of all, followed at once by the request.
        let (got, rest) = read_all(b"PROXY UNKNOWN\r\nGET");
        assert_eq!(got.unwrap(), None);
        assert_eq!(rest, b"GET");
        let (got, _) = read_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n");
        assert_eq!(got.unwrap(), None);
    }

    #[test]
    fn version_1_refuses_what_breaks_the_spec() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 01 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2\r\n",
        ] {
            // As a client sends it: the request right behind the line.
            let sent = [bad, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
            assert!(matches!(read_all(&sent).0, Err(Error::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert!(matches!(read_all(long.as_bytes()).0, Err(Error::Malformed(_))));
        assert!(matches!(read_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").0, Err(Error::Missing)));
        assert!(matches!(read_all(b"PROXY TCP4 1.2.3.4").0, Err(Error::Io(_))), "cut short");
    }

    #[test]
    fn version_2_tcp4_tcp6_local_and_tlvs() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut bytes = v2_header(src, dst);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let (got, rest) = read_all(&bytes);
        assert_eq!(got.unwrap(), Some(src));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");

        let src6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        let (got, _) = read_all(&v2_header(src6, "[2001:db8::1]:443".parse().unwrap()));
        assert_eq!(got.unwrap(), Some(src6));

        // TLVs after the addresses are skipped (and consumed).
        let mut tlv = v2_header(src, dst);
        tlv[15] = 12 + 7;
        tlv.extend_from_slice(&[0x01, 0x00, 0x04, b'h', b'2', b'x', b'y']);
        tlv.push(b'Z');
        let (got, rest) = read_all(&tlv);
        assert_eq!(got.unwrap(), Some(src));
        assert_eq!(rest, b"Z");

        // LOCAL (a balancer's health check): no address, use the socket's.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00, b'Z']);
        let (got, rest) = read_all(&local);
        assert_eq!(got.unwrap(), None);
        assert_eq!(rest, b"Z");
    }

    #[test]
    fn version_2_refuses_what_breaks_the_spec() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let good = v2_header(src, "10.0.0.1:443".parse().unwrap());
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        assert!(matches!(read_all(&with(12, 0x11)).0, Err(Error::Malformed(_))), "version 1 in a v2 header");
        assert!(matches!(read_all(&with(12, 0x22)).0, Err(Error::Malformed(_))), "unknown command");
        assert!(matches!(read_all(&with(13, 0x51)).0, Err(Error::Malformed(_))), "unknown family");
        assert!(matches!(read_all(&with(15, 4)).0, Err(Error::Malformed(_))), "block too short");
        let mut huge = good.clone();
        huge[14] = 0xff;
        assert!(matches!(read_all(&huge).0, Err(Error::Malformed(_))), "block over the cap");
    }

    #[test]
    fn a_silent_client_times_out() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (mut client, mut server) = tokio::io::duplex(64);
        let got = rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"PROXY TCP4 ").await.unwrap();
            read_header(&mut server, Duration::from_millis(50)).await
        });
        assert!(matches!(got, Err(Error::Timeout(_))));
    }
}
