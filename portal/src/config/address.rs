//! Backend addresses: `host:port`, with IPv6 literals in brackets.
//!
//! May import: nothing outside `config`.

use std::{fmt, net::IpAddr, str::FromStr};

/// A validated `host:port`. The host is an IP literal or a DNS name, resolved at connect time
/// so that a node that moves keeps being reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl Address {
    /// The host as an IP address, when it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct AddressError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| AddressError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("missing ']' after the IPv6 address"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(fail("the part in brackets is not an IPv6 address"));
            }
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| fail("expected ':port' after ']'"))?;
            (host, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| fail("expected host:port, as db-0.db.ns.svc:6379"))?;
            if host.contains(':') {
                return Err(fail("write IPv6 addresses in brackets, as [::1]:6379"));
            }
            if host.is_empty() {
                return Err(fail("the host is empty"));
            }
            if host.parse::<std::net::Ipv4Addr>().is_err() {
                super::text::check_dns_name(&host.to_ascii_lowercase()).map_err(|m| {
                    fail(&format!(
                        "the host is neither an IP address nor a DNS name: {m}"
                    ))
                })?;
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| fail("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(fail("the port must be a number from 1 to 65535"));
        }
        Ok(Address {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_ipv4_and_bracketed_ipv6() {
        for (input, host, port) in [
            (
                "orders-0.orders-db.shop.svc:6379",
                "orders-0.orders-db.shop.svc",
                6379,
            ),
            ("127.0.0.1:5432", "127.0.0.1", 5432),
            ("[::1]:6379", "::1", 6379),
            ("[2001:db8::7]:1", "2001:db8::7", 1),
            ("Redis-Primary:6379", "Redis-Primary", 6379),
        ] {
            let a: Address = input.parse().unwrap();
            assert_eq!((a.host.as_str(), a.port), (host, port), "{input}");
            assert_eq!(a.to_string(), input);
        }
    }

    #[test]
    fn refuses_with_the_reason() {
        for (input, needle) in [
            ("redis", "expected host:port"),
            ("::1:6379", "brackets"),
            ("[::1:6379", "missing ']'"),
            ("[nope]:1", "not an IPv6"),
            ("[::1]6379", "expected ':port'"),
            ("db:0", "1 to 65535"),
            ("db:65536", "1 to 65535"),
            ("db:http", "1 to 65535"),
            (":6379", "host is empty"),
            ("db_0:6379", "neither an IP address nor a DNS name"),
        ] {
            let e = input.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains(needle), "{input}: {e}");
        }
    }
}
