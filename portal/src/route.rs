//! Backend choice: which backends may take a new session, and in which order to try them
//! for `first`, `roundrobin`, `leastconn`, `source` and `leader`.
//!
//! May import: `allow`, `config`, `health`. Pure: no I/O.

use std::net::IpAddr;

use crate::{
    config::{Config, RoutingMode},
    health::HealthView,
};

/// Whether the health view lets `name` take new sessions. A backend the view does not know
/// yet (just added by a reload, not probed) is assumed up, as the checker does at start.
pub fn is_up(health: &HealthView, name: &str) -> bool {
    health.is_up(name)
}

/// Indexes (into `config.backends`) of the backends that may take a new session, in list
/// order.
pub fn eligible(config: &Config, health: &HealthView) -> Vec<usize> {
    match config.routing {
        RoutingMode::Leader => leader_eligible(config, health),
        _ => up_in_order(config, health),
    }
}

/// `leader` mode: the node the checker reports as leader, if it is up; nothing while there is
/// no leader or several claim to lead (new sessions then wait for one).
pub fn leader_eligible(config: &Config, health: &HealthView) -> Vec<usize> {
    if let Some(name) = health.leader_name() {
        if let Some(i) = config.backends.iter().position(|b| b.name == name) {
            if is_up(health, name) {
                return vec![i];
            }
        }
    }
    Vec::new()
}

fn up_in_order(config: &Config, health: &HealthView) -> Vec<usize> {
    config
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| is_up(health, &b.name))
        .map(|(i, _)| i)
        .collect()
}

/// The order in which to try `eligible` backends for one new session: the choice of `mode`
/// first, then the others as fallbacks when it refuses or times out.
///
/// `ticket` is a per-portal counter taken once per session (round robin, and tie-breaks for
/// leastconn); `active(i)` is the number of open sessions on backend `i`.
pub fn order(
    mode: RoutingMode,
    eligible: &[usize],
    client: IpAddr,
    ticket: usize,
    active: impl Fn(usize) -> u64,
) -> Vec<usize> {
    let n = eligible.len();
    if n == 0 {
        return Vec::new();
    }
    let rotated =
        |start: usize| -> Vec<usize> { (0..n).map(|k| eligible[(start + k) % n]).collect() };
    match mode {
        RoutingMode::First | RoutingMode::Leader => eligible.to_vec(),
        RoutingMode::Roundrobin => rotated(ticket % n),
        RoutingMode::Leastconn => {
            let mut list = rotated(ticket % n);
            list.sort_by_key(|&i| active(i));
            list
        }
        RoutingMode::Source => rotated((source_hash(client) % n as u64) as usize),
    }
}

/// A hash of the client address that is stable across runs and versions (FNV-1a, then a
/// finalizer so that neighbouring addresses spread).
pub fn source_hash(client: IpAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes: Vec<u8> = match crate::allow::canonical(client) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config(mode: &str, n: usize) -> Config {
        let backends: String = (0..n)
            .map(|i| format!("  - {{name: b{i}, address: \"127.0.0.1:{}\"}}\n", 7000 + i))
            .collect();
        crate::config::parse_yaml(&format!(
            "engine: redis\nrouting: {{mode: {mode}}}\ntls: {{mode: disabled}}\nbackends:\n{backends}"
        ))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn view(up: &[bool], leader: Option<usize>) -> HealthView {
        let names: Vec<String> = (0..up.len()).map(|i| format!("b{i}")).collect();
        let mut v = HealthView::assume_up(names.iter().map(String::as_str));
        for (b, &up) in v.backends.iter_mut().zip(up) {
            b.up = up;
        }
        v.leader = leader;
        v
    }

    #[test]
    fn eligible_skips_down_nodes_and_assumes_unknown_up() {
        let c = config("first", 3);
        assert_eq!(eligible(&c, &view(&[true, false, true], None)), vec![0, 2]);
        assert_eq!(
            eligible(&c, &view(&[false, false, false], None)),
            Vec::<usize>::new()
        );
        assert_eq!(eligible(&c, &HealthView::default()), vec![0, 1, 2]);
    }

    #[test]
    fn leader_mode_routes_to_the_leader_only() {
        let c = config("leader", 3);
        let none: Vec<usize> = Vec::new();
        assert_eq!(eligible(&c, &view(&[false, true, true], None)), none);
        assert_eq!(eligible(&c, &view(&[true, true, true], Some(2))), vec![2]);
        let mut conflicted = view(&[true, true, true], Some(2));
        conflicted.conflict = true;
        assert_eq!(eligible(&c, &conflicted), none);
    }

    #[test]
    fn first_keeps_list_order() {
        let o = order(RoutingMode::First, &[0, 2, 3], ip("10.0.0.1"), 7, |_| 0);
        assert_eq!(o, vec![0, 2, 3]);
    }

    #[test]
    fn roundrobin_rotates() {
        let firsts: Vec<usize> = (0..6)
            .map(|t| {
                order(
                    RoutingMode::Roundrobin,
                    &[0, 1, 2],
                    ip("10.0.0.1"),
                    t,
                    |_| 0,
                )[0]
            })
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(
            order(
                RoutingMode::Roundrobin,
                &[0, 1, 2],
                ip("10.0.0.1"),
                1,
                |_| 0
            ),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn leastconn_prefers_fewest_sessions_then_rotates_ties() {
        let active = |i: usize| [5u64, 1, 3][i];
        assert_eq!(
            order(
                RoutingMode::Leastconn,
                &[0, 1, 2],
                ip("10.0.0.1"),
                0,
                active
            ),
            vec![1, 2, 0]
        );
        let tie = |_| 0u64;
        let a = order(RoutingMode::Leastconn, &[0, 1], ip("10.0.0.1"), 0, tie)[0];
        let b = order(RoutingMode::Leastconn, &[0, 1], ip("10.0.0.1"), 1, tie)[0];
        assert_ne!(a, b);
    }

    #[test]
    fn source_is_sticky_and_spreads() {
        let mut seen = std::collections::HashSet::new();
        for last in 2..40u8 {
            let client = IpAddr::from([127, 0, 0, last]);
            let a = order(RoutingMode::Source, &[0, 1, 2], client, 0, |_| 0);
            let b = order(RoutingMode::Source, &[0, 1, 2], client, 99, |_| 7);
            assert_eq!(a, b, "{client}");
            assert_eq!(a.len(), 3);
            seen.insert(a[0]);
        }
        assert_eq!(seen.len(), 3);
        // A mapped client hashes like its IPv4 address.
        assert_eq!(
            source_hash(ip("::ffff:10.1.2.3")),
            source_hash(ip("10.1.2.3"))
        );
    }

    #[test]
    fn no_eligible_backend_no_candidates() {
        for mode in [
            RoutingMode::First,
            RoutingMode::Roundrobin,
            RoutingMode::Leastconn,
            RoutingMode::Source,
            RoutingMode::Leader,
        ] {
            assert!(order(mode, &[], ip("10.0.0.1"), 0, |_| 0).is_empty());
        }
    }
}
