//! Backend choice: which backends may take a new session, and in which order to try them
//! for `first`, `roundrobin`, `leastconn`, `source` and `leader`, by weight.
//!
//! - A backend takes new sessions when it is up and its state (the configuration's, or the
//!   admin endpoint's override) is `ready`; `backup` backends only when no other one may
//!   (never in `leader` mode, which follows the leader alone).
//! - Weights are in units of 1/256 so that `slowStart` can ramp a recovered backend's share
//!   smoothly, even from weight 1. Equal weights keep the exact rotation of `roundrobin` and
//!   the plain hash of `source`; unequal ones spread sessions by a low-discrepancy sequence
//!   (round robin) or a weighted hash (source), and `leastconn` compares sessions per weight.
//!
//! The read-only listener routes by a view of its own ([`read_only_view`]): only the replicas
//! that qualify for reads are up in it, or the leader alone when none does and
//! `readOnly.fallbackToLeader` allows.
//!
//! May import: `allow`, `config`, `control`, `health`. Pure: no I/O.

use std::{net::IpAddr, time::Instant};

use crate::{
    config::{BackendState, Config, RoutingMode},
    control::Overrides,
    health::{HealthView, Replicating},
};

/// One unit of configured weight, in the units [`weights`] returns.
pub const WEIGHT_UNIT: u64 = 256;

/// Whether the health view lets `name` take new sessions. A backend the view does not know
/// yet (just added by a reload, not probed) is assumed up, as the checker does at start.
pub fn is_up(health: &HealthView, name: &str) -> bool {
    health.is_up(name)
}

/// Whether backend `i` is up and `ready` (any state when `overrides` is `None`).
fn available(
    config: &Config,
    health: &HealthView,
    overrides: Option<&Overrides>,
    i: usize,
) -> bool {
    let b = &config.backends[i];
    is_up(health, &b.name) && overrides.is_none_or(|o| o.state(b) == BackendState::Ready)
}

/// Whether the backend named `name` may take reads: up, a replica replicating within
/// `readOnly.maxLag`, and not the leader (etcd: every healthy member replicates, the one the
/// main listener leads with excepted).
pub fn qualifies_for_reads(health: &HealthView, name: &str) -> bool {
    health.leader_name() != Some(name)
        && health
            .get(name)
            .is_some_and(|b| b.up && b.replicating == Some(Replicating::Within))
}

/// The health view the read-only listener routes by: the replicas that qualify for reads are
/// up, every other node down; when none qualifies (or every one that does is drained or in
/// maintenance) and `readOnly.fallbackToLeader` is on, the leader alone is up. The leader
/// stays named, so that a session on a replica just promoted can be told from one on the
/// leader taken as the fallback.
pub fn read_only_view(config: &Config, health: &HealthView, overrides: &Overrides) -> HealthView {
    let fallback = config
        .read_only
        .as_ref()
        .is_some_and(|r| r.fallback_to_leader);
    let mut view = health.clone();
    let serving: Vec<bool> = view
        .backends
        .iter()
        .map(|b| qualifies_for_reads(health, &b.name))
        .collect();
    let ready = |name: &str| {
        config
            .backends
            .iter()
            .find(|b| b.name == name)
            .is_some_and(|b| overrides.state(b) == BackendState::Ready)
    };
    let none = !view
        .backends
        .iter()
        .zip(&serving)
        .any(|(b, &serves)| serves && ready(&b.name));
    let leader = health.leader_name().map(str::to_string);
    for (b, serves) in view.backends.iter_mut().zip(serving) {
        let is_leader = leader.as_deref() == Some(b.name.as_str());
        b.up = serves || (none && fallback && is_leader && b.up);
    }
    view
}

/// The names of the backends a new client of the read-only listener may reach now (the
/// replicas that qualify and take new sessions, or the leader as the fallback), in list order.
pub fn serving_reads(config: &Config, health: &HealthView, overrides: &Overrides) -> Vec<String> {
    // By the read-only listener's configuration: its routing mode, not the main one's.
    let reads = config.for_reads();
    let config = reads.as_ref().unwrap_or(config);
    let view = read_only_view(config, health, overrides);
    eligible(config, &view, overrides)
        .into_iter()
        .map(|i| config.backends[i].name.clone())
        .collect()
}

/// Indexes (into `config.backends`) of the backends that may take a new session, in list
/// order.
pub fn eligible(config: &Config, health: &HealthView, overrides: &Overrides) -> Vec<usize> {
    eligible_with(config, health, Some(overrides))
}

/// The backends that [`eligible`] would give were every backend `ready`: those that health
/// and leadership allow. Shared server connections (multiplexing, pooling) to a backend that
/// leaves this set are retired; a drained backend keeps them for the work in flight.
pub fn eligible_by_health(config: &Config, health: &HealthView) -> Vec<usize> {
    eligible_with(config, health, None)
}

fn eligible_with(
    config: &Config,
    health: &HealthView,
    overrides: Option<&Overrides>,
) -> Vec<usize> {
    match config.routing {
        RoutingMode::Leader => leader_eligible(config, health, overrides),
        _ => {
            let ready: Vec<usize> = (0..config.backends.len())
                .filter(|&i| available(config, health, overrides, i))
                .collect();
            let primary: Vec<usize> = ready
                .iter()
                .copied()
                .filter(|&i| !config.backends[i].backup)
                .collect();
            if primary.is_empty() {
                ready
            } else {
                primary
            }
        }
    }
}

/// `leader` mode: the node the checker reports as leader, if it is up and ready; nothing
/// while there is no leader or several claim to lead (new sessions then wait for one).
fn leader_eligible(
    config: &Config,
    health: &HealthView,
    overrides: Option<&Overrides>,
) -> Vec<usize> {
    if let Some(name) = health.leader_name() {
        if let Some(i) = config.backends.iter().position(|b| b.name == name) {
            if available(config, health, overrides, i) {
                return vec![i];
            }
        }
    }
    Vec::new()
}

/// The weight of each backend now, in units of 1/[`WEIGHT_UNIT`]: the configured (or
/// overridden) weight, ramped over `slowStart` after the backend came back up.
pub fn weights(
    config: &Config,
    health: &HealthView,
    overrides: &Overrides,
    now: Instant,
) -> Vec<u64> {
    config
        .backends
        .iter()
        .map(|b| {
            let full = u64::from(overrides.weight(b)) * WEIGHT_UNIT;
            let up_at = health
                .backends
                .iter()
                .find(|h| h.name == b.name)
                .and_then(|h| h.up_at);
            match up_at {
                Some(at) if !b.slow_start.is_zero() => {
                    let elapsed = now.saturating_duration_since(at);
                    if elapsed >= b.slow_start {
                        full
                    } else {
                        let part =
                            full as u128 * elapsed.as_millis() / b.slow_start.as_millis().max(1);
                        (part as u64).max(1)
                    }
                }
                _ => full,
            }
        })
        .collect()
}

/// The order in which to try `eligible` backends for one new session: the choice of `mode`
/// first, then the others as fallbacks when it refuses, is full or times out.
///
/// `ticket` is a per-portal counter taken once per session (round robin, and tie-breaks for
/// leastconn); `weight(i)` is backend `i`'s weight (see [`weights`]); `active(i)` is the
/// number of open sessions on backend `i`.
pub fn order(
    mode: RoutingMode,
    eligible: &[usize],
    client: IpAddr,
    ticket: usize,
    weight: impl Fn(usize) -> u64,
    active: impl Fn(usize) -> u64,
) -> Vec<usize> {
    let n = eligible.len();
    if n == 0 {
        return Vec::new();
    }
    let rotated =
        |start: usize| -> Vec<usize> { (0..n).map(|k| eligible[(start + k) % n]).collect() };
    let w: Vec<u64> = eligible.iter().map(|&i| weight(i).max(1)).collect();
    let equal = w.iter().all(|&x| x == w[0]);
    // The position (into `eligible`) that a point in [0, 1) of the weighted line falls on.
    let pick = |point: f64| -> usize {
        let total: u64 = w.iter().sum();
        let target = ((point * total as f64) as u64).min(total - 1);
        let mut acc = 0;
        for (k, &x) in w.iter().enumerate() {
            acc += x;
            if target < acc {
                return k;
            }
        }
        n - 1
    };
    match mode {
        RoutingMode::First | RoutingMode::Leader => eligible.to_vec(),
        RoutingMode::Roundrobin if equal => rotated(ticket % n),
        RoutingMode::Roundrobin => {
            // The golden-ratio sequence: consecutive tickets land far apart on the weighted
            // line, and every stretch of tickets covers it in proportion.
            const PHI: f64 = 0.618_033_988_749_894_9;
            rotated(pick((ticket as f64 * PHI).fract()))
        }
        RoutingMode::Leastconn => {
            let mut list = rotated(ticket % n);
            let weight_of = |i: usize| w[eligible.iter().position(|&e| e == i).unwrap_or(0)];
            // Fewest sessions per unit of weight first: a/wa < b/wb ⇔ a·wb < b·wa.
            list.sort_by(|&a, &b| {
                (u128::from(active(a)) * u128::from(weight_of(b)))
                    .cmp(&(u128::from(active(b)) * u128::from(weight_of(a))))
            });
            list
        }
        RoutingMode::Source if equal => rotated((source_hash(client) % n as u64) as usize),
        RoutingMode::Source => {
            let point = (source_hash(client) >> 11) as f64 / (1u64 << 53) as f64;
            rotated(pick(point))
        }
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

    fn none_set() -> Overrides {
        Overrides::default()
    }

    /// [`order`] with equal weights.
    fn ordered(
        mode: RoutingMode,
        eligible: &[usize],
        client: IpAddr,
        ticket: usize,
        active: impl Fn(usize) -> u64,
    ) -> Vec<usize> {
        order(mode, eligible, client, ticket, |_| WEIGHT_UNIT, active)
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
        assert_eq!(
            eligible(&c, &view(&[true, false, true], None), &none_set()),
            vec![0, 2]
        );
        assert_eq!(
            eligible(&c, &view(&[false, false, false], None), &none_set()),
            Vec::<usize>::new()
        );
        assert_eq!(
            eligible(&c, &HealthView::default(), &none_set()),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn leader_mode_routes_to_the_leader_only() {
        let c = config("leader", 3);
        let none: Vec<usize> = Vec::new();
        assert_eq!(
            eligible(&c, &view(&[false, true, true], None), &none_set()),
            none
        );
        assert_eq!(
            eligible(&c, &view(&[true, true, true], Some(2)), &none_set()),
            vec![2]
        );
        let mut conflicted = view(&[true, true, true], Some(2));
        conflicted.conflict = true;
        assert_eq!(eligible(&c, &conflicted, &none_set()), none);
    }

    #[test]
    fn first_keeps_list_order() {
        let o = ordered(RoutingMode::First, &[0, 2, 3], ip("10.0.0.1"), 7, |_| 0);
        assert_eq!(o, vec![0, 2, 3]);
    }

    #[test]
    fn roundrobin_rotates() {
        let firsts: Vec<usize> = (0..6)
            .map(|t| {
                ordered(
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
            ordered(
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
            ordered(
                RoutingMode::Leastconn,
                &[0, 1, 2],
                ip("10.0.0.1"),
                0,
                active
            ),
            vec![1, 2, 0]
        );
        let tie = |_| 0u64;
        let a = ordered(RoutingMode::Leastconn, &[0, 1], ip("10.0.0.1"), 0, tie)[0];
        let b = ordered(RoutingMode::Leastconn, &[0, 1], ip("10.0.0.1"), 1, tie)[0];
        assert_ne!(a, b);
    }

    #[test]
    fn source_is_sticky_and_spreads() {
        let mut seen = std::collections::HashSet::new();
        for last in 2..40u8 {
            let client = IpAddr::from([127, 0, 0, last]);
            let a = ordered(RoutingMode::Source, &[0, 1, 2], client, 0, |_| 0);
            let b = ordered(RoutingMode::Source, &[0, 1, 2], client, 99, |_| 7);
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
            assert!(ordered(mode, &[], ip("10.0.0.1"), 0, |_| 0).is_empty());
        }
    }

    fn weighted(mode: &str, extra: &[&str]) -> Config {
        let backends: String = extra
            .iter()
            .enumerate()
            .map(|(i, e)| {
                format!(
                    "  - {{name: b{i}, address: \"127.0.0.1:{}\"{e}}}\n",
                    7000 + i
                )
            })
            .collect();
        crate::config::parse_yaml(&format!(
            "engine: redis\nrouting: {{mode: {mode}}}\ntls: {{mode: disabled}}\nbackends:\n{backends}"
        ))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn shares(mode: RoutingMode, weights: &[u64], n: usize) -> Vec<usize> {
        let eligible: Vec<usize> = (0..weights.len()).collect();
        let mut counts = vec![0; weights.len()];
        for t in 0..n {
            let client = IpAddr::from([10, (t >> 16) as u8, (t >> 8) as u8, t as u8]);
            counts[order(mode, &eligible, client, t, |i| weights[i], |_| 0)[0]] += 1;
        }
        counts
    }

    #[test]
    fn weights_share_roundrobin_and_source() {
        for mode in [RoutingMode::Roundrobin, RoutingMode::Source] {
            let counts = shares(mode, &[256, 768], 1000);
            assert!((230..=270).contains(&counts[0]), "{mode:?}: {counts:?}");
            let counts = shares(mode, &[256, 256, 512], 1000);
            assert!((220..=280).contains(&counts[0]), "{mode:?}: {counts:?}");
            assert!((450..=550).contains(&counts[2]), "{mode:?}: {counts:?}");
        }
        // Round robin spreads consecutive sessions: no backend gets 3 in a row at 1:1:2.
        let picks: Vec<usize> = (0..40)
            .map(|t| {
                order(
                    RoutingMode::Roundrobin,
                    &[0, 1, 2],
                    ip("10.0.0.1"),
                    t,
                    |i| [256, 256, 512][i],
                    |_| 0,
                )[0]
            })
            .collect();
        assert!(
            picks.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
            "{picks:?}"
        );
    }

    #[test]
    fn leastconn_counts_sessions_per_weight() {
        // b0: 4 sessions at weight 1 (4 per unit), b1: 6 at weight 3 (2 per unit).
        let o = order(
            RoutingMode::Leastconn,
            &[0, 1],
            ip("10.0.0.1"),
            0,
            |i| [256, 768][i],
            |i| [4, 6][i],
        );
        assert_eq!(o, vec![1, 0]);
    }

    #[test]
    fn backups_only_when_no_other_backend_may() {
        let c = weighted("roundrobin", &["", ", backup: true", ""]);
        let none = none_set();
        assert_eq!(
            eligible(&c, &view(&[true, true, true], None), &none),
            vec![0, 2]
        );
        assert_eq!(
            eligible(&c, &view(&[false, true, true], None), &none),
            vec![2]
        );
        assert_eq!(
            eligible(&c, &view(&[false, true, false], None), &none),
            vec![1]
        );
        // Leader mode follows the leader, backup or not.
        let c = weighted("leader", &["", ", backup: true"]);
        assert_eq!(eligible(&c, &view(&[true, true], Some(1)), &none), vec![1]);
    }

    #[test]
    fn drained_and_maintained_backends_take_no_new_sessions() {
        let c = weighted("roundrobin", &["", ", state: drain", ", state: maint"]);
        let none = none_set();
        assert_eq!(
            eligible(&c, &view(&[true, true, true], None), &none),
            vec![0]
        );
        // The runtime override wins over the configuration, both ways.
        let control = crate::control::Control::default();
        control.set_state("b1", Some(BackendState::Ready));
        control.set_state("b0", Some(BackendState::Maint));
        assert_eq!(
            eligible(&c, &view(&[true, true, true], None), &control.current()),
            vec![1]
        );
        // A drained leader: nothing to route to.
        let c = weighted("leader", &["", ", state: drain"]);
        assert!(eligible(&c, &view(&[true, true], Some(1)), &none).is_empty());
    }

    #[test]
    fn slow_start_ramps_the_weight_of_a_recovered_backend() {
        let c = weighted(
            "roundrobin",
            &[", weight: 4, slowStart: 10s", ", weight: 2"],
        );
        let mut v = view(&[true, true], None);
        let now = Instant::now();
        // Up since the portal started: full weight.
        assert_eq!(
            weights(&c, &v, &none_set(), now),
            vec![4 * WEIGHT_UNIT, 2 * WEIGHT_UNIT]
        );
        v.backends[0].up_at = Some(now);
        assert_eq!(
            weights(&c, &v, &none_set(), now)[0],
            1,
            "at least 1 unit at once"
        );
        let later = now + std::time::Duration::from_millis(2500);
        assert_eq!(weights(&c, &v, &none_set(), later)[0], WEIGHT_UNIT);
        let done = now + std::time::Duration::from_secs(11);
        assert_eq!(weights(&c, &v, &none_set(), done)[0], 4 * WEIGHT_UNIT);
        // A runtime weight replaces the configured one.
        let control = crate::control::Control::default();
        control.set_weight("b1", Some(9));
        assert_eq!(
            weights(&c, &v, &control.current(), done)[1],
            9 * WEIGHT_UNIT
        );
    }

    fn reads(fallback: bool) -> Config {
        crate::config::parse_yaml(&format!(
            "engine: postgres\ntls: {{mode: disabled}}\nreadOnly: {{fallbackToLeader: {fallback}}}\nbackends:\n  - {{name: b0, address: \"127.0.0.1:7000\"}}\n  - {{name: b1, address: \"127.0.0.1:7001\"}}\n  - {{name: b2, address: \"127.0.0.1:7002\"}}\n"
        ))
        .unwrap()
        .validate()
        .unwrap()
        .for_reads()
        .unwrap()
    }

    #[test]
    fn reads_go_to_qualifying_replicas_only() {
        let c = reads(true);
        let mut v = view(&[true, true, true], Some(0));
        v.backends[1].replicating = Some(Replicating::Within);
        v.backends[2].replicating = Some(Replicating::Lagging);
        assert_eq!(serving_reads(&c, &v, &none_set()), ["b1"]);
        let ro = read_only_view(&c, &v, &none_set());
        assert_eq!(ro.leader_name(), Some("b0"), "the leader stays named");
        assert_eq!(eligible(&c, &ro, &none_set()), [1]);

        v.backends[2].replicating = Some(Replicating::Within);
        assert_eq!(serving_reads(&c, &v, &none_set()), ["b1", "b2"]);
        v.backends[2].up = false;
        assert_eq!(
            serving_reads(&c, &v, &none_set()),
            ["b1"],
            "a replica down serves nothing"
        );
        v.backends[1].replicating = Some(Replicating::Broken("link down"));
        assert_eq!(
            serving_reads(&c, &v, &none_set()),
            ["b0"],
            "none qualifies: the leader"
        );
        assert!(
            serving_reads(&reads(false), &v, &none_set()).is_empty(),
            "no fallback: nobody"
        );
        v.leader = None;
        assert!(
            serving_reads(&c, &v, &none_set()).is_empty(),
            "no leader to fall back to"
        );
    }

    #[test]
    fn a_promoted_replica_leaves_the_read_set() {
        let c = reads(false);
        let mut v = view(&[true, true, true], Some(0));
        for b in &mut v.backends[1..] {
            b.replicating = Some(Replicating::Within);
        }
        assert_eq!(serving_reads(&c, &v, &none_set()), ["b1", "b2"]);
        // b1 promoted: it leads, and measures no lag of its own.
        v.leader = Some(1);
        v.backends[0].up = false;
        assert_eq!(serving_reads(&c, &v, &none_set()), ["b2"]);
        // etcd-like: the leader keeps a standing of its own but still takes no reads here.
        assert!(!qualifies_for_reads(&v, "b1"));
    }

    #[test]
    fn reads_honour_weights_and_administrative_state() {
        let c = reads(true);
        let mut v = view(&[true, true, true], Some(0));
        for b in &mut v.backends[1..] {
            b.replicating = Some(Replicating::Within);
        }
        let ro = read_only_view(&c, &v, &none_set());
        let control = crate::control::Control::default();
        control.set_state("b1", Some(BackendState::Drain));
        assert_eq!(eligible(&c, &ro, &control.current()), [2]);
        assert_eq!(serving_reads(&c, &v, &control.current()), ["b2"]);
        assert_eq!(c.routing, RoutingMode::Roundrobin);

        // Every qualifying replica drained: the leader takes reads as the fallback...
        control.set_state("b2", Some(BackendState::Maint));
        let ro = read_only_view(&c, &v, &control.current());
        assert_eq!(eligible(&c, &ro, &control.current()), [0]);
        assert_eq!(serving_reads(&c, &v, &control.current()), ["b0"]);
        // ...or nobody, without the fallback.
        assert!(serving_reads(&reads(false), &v, &control.current()).is_empty());
    }
}
