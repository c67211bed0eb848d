//! The allow-list decision: may a client address connect under `allowedCIDRs`.
//!
//! May import: nothing from the crate. Its tests use `config`.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address as the allow-list and the per-client limit see it: an IPv4-mapped IPv6
/// address (`::ffff:10.1.2.3`, what a dual-stack listener reports) is its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` may connect. An empty list admits everyone. IPv4 ranges match IPv4-mapped
/// IPv6 clients, and ranges written in the mapped form (`::ffff:10.0.0.0/104`) match IPv4
/// clients. So `::/0`, which contains every mapped address, admits every IPv4 client too:
/// "all addresses", as HAProxy's `src ::/0` means it; an IPv6-only list names IPv6 prefixes
/// narrower than `::/1` (`2000::/3` for all global unicast IPv6).
pub fn is_allowed(cidrs: &[IpNet], ip: IpAddr) -> bool {
    if cidrs.is_empty() {
        return true;
    }
    let ip = canonical(ip);
    let mapped = match ip {
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        IpAddr::V6(_) => None,
    };
    cidrs
        .iter()
        .any(|net| net.contains(&ip) || mapped.is_some_and(|m| net.contains(&m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| crate::config::parse_cidr(s).unwrap())
            .collect()
    }

    #[test]
    fn empty_list_admits_everyone() {
        assert!(is_allowed(&[], "10.1.2.3".parse().unwrap()));
        assert!(is_allowed(&[], "2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn decisions() {
        let list = nets(&[
            "10.0.0.0/8",
            "2001:db8::/32",
            "192.168.1.7",
            "::ffff:172.16.0.0/108",
        ]);
        for (ip, want) in [
            ("10.0.0.1", true),
            ("10.255.255.255", true),
            ("11.0.0.1", false),
            ("::ffff:10.9.8.7", true),
            ("::ffff:11.9.8.7", false),
            ("2001:db8::1", true),
            ("2001:db8:ffff::1", true),
            ("2001:db9::1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("::ffff:192.168.1.7", true),
            ("172.16.3.4", true),
            ("172.32.0.1", false),
            ("::1", false),
            ("127.0.0.1", false),
        ] {
            assert_eq!(is_allowed(&list, ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn all_ipv6_admits_ipv4_too_but_global_unicast_does_not() {
        let all = nets(&["::/0"]);
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "::ffff:10.1.2.3",
            "2001:db8::1",
            "::1",
        ] {
            assert!(is_allowed(&all, ip.parse().unwrap()), "::/0 admits {ip}");
        }
        let global = nets(&["2000::/3"]);
        assert!(is_allowed(&global, "2001:db8::1".parse().unwrap()));
        assert!(!is_allowed(&global, "10.1.2.3".parse().unwrap()));
        assert!(!is_allowed(&global, "::ffff:10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn canonical_unmaps_only_mapped_addresses() {
        assert_eq!(
            canonical("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical("::1".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
    }
}
