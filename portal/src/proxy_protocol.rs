//! PROXY protocol: parsing v1 (text) and v2 (binary) headers from a load balancer, and
//! writing v2 headers to backends.
//!
//! May import: `allow`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// Longest v2 header we accept (addresses plus TLVs); real load balancers send far less.
pub const V2_MAX: usize = 16 + 2048;

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection from `source` to `destination`.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy's own connection (v2 LOCAL, v1 UNKNOWN, or a family without addresses):
    /// the peer address of the connection stands.
    Local,
}

/// Why a header was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("invalid v1 header: {0}")]
    V1(&'static str),
    #[error("invalid v2 header: {0}")]
    V2(&'static str),
    #[error("the connection closed inside the PROXY header")]
    Truncated,
}

/// Parses a header at the start of `buf`. `Ok(None)`: not enough bytes yet.
/// `Ok(Some((header, n)))`: the header is the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        parse_v1(buf)
    } else if buf[0] == b'\r' {
        parse_v2(buf)
    } else {
        Err(ParseError::NotProxy)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    const PREFIX: &[u8] = b"PROXY ";
    let k = buf.len().min(PREFIX.len());
    if buf[..k] != PREFIX[..k] {
        return Err(ParseError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ParseError::V1TooLong);
        }
        if window.contains(&b'\n') {
            return Err(ParseError::V1("line ends without CR"));
        }
        return Ok(None);
    };
    let line =
        std::str::from_utf8(&buf[PREFIX.len()..end]).map_err(|_| ParseError::V1("not ASCII"))?;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    if proto == "UNKNOWN" {
        return Ok(Some((Header::Local, end + 2)));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ParseError::V1("expected 4 fields after the protocol"));
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| ParseError::V1("bad IPv4 source"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| ParseError::V1("bad IPv4 destination"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| ParseError::V1("bad IPv6 source"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| ParseError::V1("bad IPv6 destination"))?
                .into(),
        ),
        _ => return Err(ParseError::V1("protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let port = |p: &str| -> Result<u16, ParseError> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::V1("bad port"));
        }
        p.parse().map_err(|_| ParseError::V1("bad port"))
    };
    Ok(Some((
        Header::Proxy {
            source: SocketAddr::new(src, port(sport)?),
            destination: SocketAddr::new(dst, port(dport)?),
        },
        end + 2,
    )))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    let k = buf.len().min(12);
    if buf[..k] != V2_SIGNATURE[..k] {
        return Err(ParseError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::V2("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ParseError::V2("unknown command")),
    };
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ParseError::V2("header too long"));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    if local {
        return Ok(Some((Header::Local, total)));
    }
    let header = match family {
        // TCP or UDP over IPv4.
        0x11 | 0x12 => {
            if body.len() < 12 {
                return Err(ParseError::V2("address block too short for IPv4"));
            }
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            Header::Proxy {
                source: SocketAddr::new(src.into(), u16::from_be_bytes([body[8], body[9]])),
                destination: SocketAddr::new(dst.into(), u16::from_be_bytes([body[10], body[11]])),
            }
        }
        0x21 | 0x22 => {
            if body.len() < 36 {
                return Err(ParseError::V2("address block too short for IPv6"));
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&body[..16]);
            d.copy_from_slice(&body[16..32]);
            Header::Proxy {
                source: SocketAddr::new(
                    Ipv6Addr::from(s).into(),
                    u16::from_be_bytes([body[32], body[33]]),
                ),
                destination: SocketAddr::new(
                    Ipv6Addr::from(d).into(),
                    u16::from_be_bytes([body[34], body[35]]),
                ),
            }
        }
        // UNSPEC and unix sockets carry no IP address.
        0x00 | 0x31 | 0x32 => Header::Local,
        _ => return Err(ParseError::V2("unknown address family")),
    };
    Ok(Some((header, total)))
}

/// Reads a header from the start of `stream`. Returns it with the bytes that arrived after
/// it (client data to forward first). Bounded by the caller's deadline.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Header, Vec<u8>), ParseError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 256];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ParseError::Truncated)?;
        if n == 0 {
            return Err(ParseError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((header, used)) = parse(&buf)? {
            buf.drain(..used);
            return Ok((header, buf));
        }
    }
}

/// A v2 PROXY header for a TCP connection from `source` to `destination`. Mixed families
/// are written as IPv6 (IPv4 mapped).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let unmap = |a: SocketAddr| SocketAddr::new(crate::allow::canonical(a.ip()), a.port());
    let (source, destination) = (unmap(source), unmap(destination));
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_valid() {
        let (h, n) = parse(b"PROXY TCP4 10.1.2.3 10.0.0.1 56324 6379\r\nPING\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(n, 41);
        assert_eq!(
            h,
            Header::Proxy {
                source: sa("10.1.2.3:56324"),
                destination: sa("10.0.0.1:6379")
            }
        );
        let (h, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Header::Proxy {
                source: sa("[2001:db8::1]:1"),
                destination: sa("[::1]:65535")
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Header::Local, 15))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n")
                .unwrap()
                .unwrap()
                .0,
            Header::Local
        );
    }

    #[test]
    fn v1_truncated_needs_more() {
        let full = b"PROXY TCP4 10.1.2.3 10.0.0.1 56324 6379\r\n";
        for k in 0..full.len() {
            assert_eq!(parse(&full[..k]), Ok(None), "{k}");
        }
    }

    #[test]
    fn v1_garbage() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXI TCP4",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"*1\r\n$4\r\nPING\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(ParseError::V1TooLong));
    }

    #[test]
    fn v2_round_trip_and_truncation() {
        for (s, d) in [
            ("10.1.2.3:4000", "10.0.0.1:6379"),
            ("[2001:db8::5]:4000", "[2001:db8::1]:6379"),
        ] {
            let bytes = encode_v2(sa(s), sa(d));
            let mut with_data = bytes.clone();
            with_data.extend_from_slice(b"PING\r\n");
            assert_eq!(
                parse(&with_data).unwrap(),
                Some((
                    Header::Proxy {
                        source: sa(s),
                        destination: sa(d)
                    },
                    bytes.len()
                ))
            );
            for k in 0..bytes.len() {
                assert_eq!(parse(&bytes[..k]), Ok(None), "{s} {k}");
            }
        }
    }

    #[test]
    fn v2_mixed_families_are_mapped() {
        let bytes = encode_v2(sa("10.1.2.3:4000"), sa("[2001:db8::1]:6379"));
        let (h, _) = parse(&bytes).unwrap().unwrap();
        assert_eq!(
            h,
            Header::Proxy {
                source: sa("[::ffff:10.1.2.3]:4000"),
                destination: sa("[2001:db8::1]:6379")
            }
        );
        // Mapped on both sides is plain IPv4 on the wire.
        let bytes = encode_v2(sa("[::ffff:10.1.2.3]:1"), sa("[::ffff:10.0.0.1]:2"));
        assert_eq!(bytes[13], 0x11);
    }

    #[test]
    fn v2_local_and_tlvs() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap(), Some((Header::Local, 16)));
        // An IPv4 address block followed by a TLV (type 0x04 NOOP, length 3).
        let mut tlv = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        tlv[14..16].copy_from_slice(&18u16.to_be_bytes());
        tlv.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
        let (h, n) = parse(&tlv).unwrap().unwrap();
        assert_eq!(n, tlv.len());
        assert!(matches!(h, Header::Proxy { .. }));
    }

    #[test]
    fn v2_garbage() {
        let good = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        let mut bad_version = good.clone();
        bad_version[12] = 0x11;
        let mut bad_command = good.clone();
        bad_command[12] = 0x2f;
        let mut bad_family = good.clone();
        bad_family[13] = 0x41;
        let mut short_block = good.clone();
        short_block[14..16].copy_from_slice(&4u16.to_be_bytes());
        let mut too_long = good.clone();
        too_long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let mut bad_signature = good.clone();
        bad_signature[5] = b'x';
        for (name, bytes) in [
            ("version", bad_version),
            ("command", bad_command),
            ("family", bad_family),
            ("short", short_block),
            ("too long", too_long),
            ("signature", bad_signature),
        ] {
            assert!(parse(&bytes).is_err(), "{name}");
        }
    }

    #[tokio::test]
    async fn read_header_keeps_the_bytes_after_it() {
        let mut input: &[u8] = b"PROXY TCP4 10.1.2.3 10.0.0.1 56324 6379\r\nPING\r\n";
        let (h, rest) = read_header(&mut input).await.unwrap();
        assert!(matches!(h, Header::Proxy { .. }));
        assert_eq!(rest, b"PING\r\n");
        let mut truncated: &[u8] = b"PROXY TCP4 10.1.2.3";
        assert_eq!(
            read_header(&mut truncated).await,
            Err(ParseError::Truncated)
        );
        let mut garbage: &[u8] = b"hello world\r\n";
        assert_eq!(read_header(&mut garbage).await, Err(ParseError::NotProxy));
    }
}
