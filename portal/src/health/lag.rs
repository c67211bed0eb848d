//! Replication lag, pure: what a probe read of a node's replication ([`Replication`]), the
//! leader's positions over time ([`Trail`]) and the lag of a replica measured against them
//! ([`Lag`]), and whether a replica is fit to serve reads within a bound ([`Replicating`]).
//!
//! Engines say lag in different units: PostgreSQL gives WAL positions (bytes) and the age of
//! the last replayed commit, Redis replication offsets (bytes), MySQL seconds, etcd raft
//! indexes (entries). Positions are turned into time here: a replica at position `x` lacks
//! what the leader had written when the portal first saw it past `x`, so its lag is the time
//! since that probe of the leader (a measure as fine as `healthCheck.interval`). Where the
//! engine also states seconds itself, the larger of the two counts.
//!
//! May import: the rest of `health` only (pure).

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// What one probe read of a node's replication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replication {
    /// The node's place in the replication stream: on a leader what it has written
    /// (PostgreSQL `pg_current_wal_lsn()`, Redis `master_repl_offset`, etcd's raft index), on
    /// a replica what it has applied (`pg_last_wal_replay_lsn()`, the replica's offset, its
    /// raft index). `None` where the engine gives none (MySQL).
    pub position: Option<u64>,
    /// Lag the engine states itself: PostgreSQL `now() - pg_last_xact_replay_timestamp()`
    /// while WAL waits to be replayed, MySQL `Seconds_Behind_Source`.
    pub lag: Option<Duration>,
    /// Why replication is broken (a replica's link to its leader down, its threads stopped):
    /// such a node is no replica to read from, whatever its lag.
    pub broken: Option<&'static str>,
}

/// A replica's lag behind the leader, as measured at its latest probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    /// Behind the leader in time; `None` while it cannot be measured (no leader position
    /// seen yet, and no lag stated by the engine).
    pub time: Option<Duration>,
    /// Behind the leader in the engine's position unit (bytes for PostgreSQL and Redis, raft
    /// entries for etcd).
    pub behind: Option<u64>,
    /// Why replication is broken, if it is.
    pub broken: Option<&'static str>,
}

/// How a replica stands for serving reads, published in the health view (it changes only
/// when the replica crosses the bound, not at every probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Replicating {
    /// Replicating, within the bound (or no bound is set).
    Within,
    /// Replicating, behind by more than the bound, or by an amount not measured yet.
    Lagging,
    /// Replication broken: the reason.
    Broken(&'static str),
}

impl Replicating {
    /// The replica's standing for `lag` under `max_lag` (`None`: no bound).
    pub fn judge(lag: &Lag, max_lag: Option<Duration>) -> Replicating {
        if let Some(why) = lag.broken {
            return Replicating::Broken(why);
        }
        match (max_lag, lag.time) {
            (None, _) => Replicating::Within,
            (Some(max), Some(t)) if t <= max => Replicating::Within,
            _ => Replicating::Lagging,
        }
    }

    /// Lower-case name for `/status` and the stats page.
    pub fn as_str(self) -> &'static str {
        match self {
            Replicating::Within => "within",
            Replicating::Lagging => "lagging",
            Replicating::Broken(_) => "broken",
        }
    }
}

/// Most leader positions kept; older ones go first (the lag of a replica behind all of them
/// is then at least the age of the oldest kept).
const TRAIL_POINTS: usize = 512;

/// The positions the leader was seen at, oldest first, each with when it was first seen.
#[derive(Clone, Debug, Default)]
pub struct Trail {
    /// The backend whose positions these are; another leader starts a new trail.
    owner: Option<String>,
    points: VecDeque<(Instant, u64)>,
}

impl Trail {
    /// The leader `owner` was at `position` at `at`.
    pub fn record(&mut self, owner: &str, at: Instant, position: u64) {
        if self.owner.as_deref() != Some(owner) {
            self.owner = Some(owner.to_string());
            self.points.clear();
        }
        match self.points.back() {
            Some(&(_, last)) if position == last => return,
            // Positions only grow on one leader: a smaller one is a new history (a restore).
            Some(&(_, last)) if position < last => self.points.clear(),
            _ => {}
        }
        if self.points.len() == TRAIL_POINTS {
            self.points.pop_front();
        }
        self.points.push_back((at, position));
    }

    /// The backend this trail follows.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The leader's latest position.
    pub fn latest(&self) -> Option<u64> {
        self.points.back().map(|&(_, p)| p)
    }

    /// How long the leader has had something a node at `position` lacks, at `now`: zero when
    /// it has all the leader was seen with; `None` before any leader position is known.
    pub fn lag_at(&self, position: u64, now: Instant) -> Option<Duration> {
        let latest = self.latest()?;
        if position >= latest {
            return Some(Duration::ZERO);
        }
        let (since, _) = self.points.iter().find(|&&(_, p)| p > position)?;
        Some(now.saturating_duration_since(*since))
    }

    /// The lag of a replica whose latest probe read `replica`, at `now`.
    pub fn lag(&self, replica: &Replication, now: Instant) -> Lag {
        let from_positions = replica.position.and_then(|p| self.lag_at(p, now));
        let time = match (from_positions, replica.lag) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Lag {
            time,
            behind: replica
                .position
                .and_then(|p| Some(self.latest()?.saturating_sub(p))),
            broken: replica.broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn lag_is_the_time_since_the_leader_passed_the_replica() {
        let t0 = Instant::now();
        let mut trail = Trail::default();
        assert_eq!(trail.lag_at(5, t0), None, "no leader position yet");
        trail.record("a", t0, 100);
        trail.record("a", t0 + secs(1), 100);
        trail.record("a", t0 + secs(2), 150);
        trail.record("a", t0 + secs(3), 200);
        let now = t0 + secs(10);
        assert_eq!(trail.lag_at(200, now), Some(Duration::ZERO));
        assert_eq!(
            trail.lag_at(250, now),
            Some(Duration::ZERO),
            "ahead of our view"
        );
        assert_eq!(trail.lag_at(150, now), Some(secs(7)));
        assert_eq!(trail.lag_at(120, now), Some(secs(8)));
        assert_eq!(
            trail.lag_at(10, now),
            Some(secs(10)),
            "behind every kept point: at least the oldest's age"
        );
    }

    #[test]
    fn another_leader_or_a_smaller_position_starts_a_new_trail() {
        let t0 = Instant::now();
        let mut trail = Trail::default();
        trail.record("a", t0, 100);
        trail.record("b", t0 + secs(5), 50);
        assert_eq!(trail.owner(), Some("b"));
        assert_eq!(trail.lag_at(40, t0 + secs(6)), Some(secs(1)));
        trail.record("b", t0 + secs(7), 10);
        assert_eq!(trail.latest(), Some(10));
        for i in 0..(TRAIL_POINTS as u64 + 10) {
            trail.record("b", t0 + secs(8 + i), 11 + i);
        }
        assert_eq!(trail.points.len(), TRAIL_POINTS, "bounded");
    }

    #[test]
    fn the_larger_of_stated_and_measured_lag_counts() {
        let t0 = Instant::now();
        let mut trail = Trail::default();
        trail.record("a", t0, 1000);
        let now = t0 + secs(4);
        let replica = Replication {
            position: Some(400),
            lag: Some(secs(9)),
            broken: None,
        };
        let lag = trail.lag(&replica, now);
        assert_eq!(lag.time, Some(secs(9)));
        assert_eq!(lag.behind, Some(600));
        let stated_only = Replication {
            lag: Some(secs(2)),
            ..Replication::default()
        };
        assert_eq!(trail.lag(&stated_only, now).time, Some(secs(2)));
        assert_eq!(trail.lag(&stated_only, now).behind, None);
        let measured = Replication {
            position: Some(1000),
            ..Replication::default()
        };
        assert_eq!(trail.lag(&measured, now).time, Some(Duration::ZERO));
    }

    #[test]
    fn standing_under_a_bound() {
        let lag = |t: Option<u64>, broken| Lag {
            time: t.map(secs),
            behind: None,
            broken,
        };
        let max = Some(secs(5));
        assert_eq!(
            Replicating::judge(&lag(Some(5), None), max),
            Replicating::Within
        );
        assert_eq!(
            Replicating::judge(&lag(Some(6), None), max),
            Replicating::Lagging
        );
        assert_eq!(
            Replicating::judge(&lag(None, None), max),
            Replicating::Lagging
        );
        assert_eq!(
            Replicating::judge(&lag(None, None), None),
            Replicating::Within
        );
        assert_eq!(
            Replicating::judge(&lag(Some(0), Some("link down")), None),
            Replicating::Broken("link down")
        );
    }
}
