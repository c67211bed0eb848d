//! The pure part of health checking: one node's rise/fall state machine and the election of
//! the leader from the nodes' roles.
//!
//! May import: the rest of `health` only (pure).

use super::{Caveat, Probed, Replication, Role};

/// One backend's health as the probes have seen it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    /// Routable.
    pub up: bool,
    /// Role of the latest successful probe.
    pub role: Role,
    /// The engine's own leadership beside the role, from the latest successful probe
    /// ([`super::Probed::engine_leader`]); cleared when the node goes down.
    pub engine_leader: Option<bool>,
    /// Consecutive successes (reset by a failure).
    pub successes: u32,
    /// Consecutive failures (reset by a success).
    pub failures: u32,
    /// Why the latest probe failed; `None` after a success.
    pub last_error: Option<String>,
    /// What the latest successful probe noticed beside the role; cleared by a failure.
    pub caveat: Option<Caveat>,
    /// The replication the latest full answer read (a busy node's is kept).
    pub replication: Replication,
    /// No probe has answered yet: the node is assumed up, and its first result decides at once
    /// (a node that is down at start-up is not routed to for `fall` intervals, and a healthy
    /// one does not wait `rise` intervals).
    pub unconfirmed: bool,
}

impl Default for NodeState {
    fn default() -> Self {
        NodeState {
            up: true,
            role: Role::Unknown,
            engine_leader: None,
            successes: 0,
            failures: 0,
            last_error: None,
            caveat: None,
            replication: Replication::default(),
            unconfirmed: true,
        }
    }
}

impl NodeState {
    /// A probe succeeded and reported `role`. The role applies at once: a replica promoted
    /// while up is the leader now, without waiting for `rise` again.
    pub fn success(&mut self, role: Role, rise: u32) {
        self.successes = self.successes.saturating_add(1);
        self.failures = 0;
        self.last_error = None;
        self.caveat = None;
        self.role = role;
        if self.unconfirmed || self.successes >= rise {
            self.up = true;
        }
        self.unconfirmed = false;
    }

    /// A probe answered: healthy with what it found. A [`Caveat::Busy`] answer says nothing of
    /// the role or the engine's leadership: the node keeps what it had (a busy leader stays
    /// the leader; no failover starts).
    pub fn alive(&mut self, probed: Probed, rise: u32) {
        if probed.caveat == Some(Caveat::Busy) {
            self.success(self.role, rise);
        } else {
            self.success(probed.role, rise);
            self.engine_leader = probed.engine_leader;
            self.replication = probed.replication;
        }
        self.caveat = probed.caveat;
    }

    /// A probe failed. The node stays up (with its last role) until `fall` failures in a row.
    pub fn failure(&mut self, error: String, fall: u32) {
        self.failures = self.failures.saturating_add(1);
        self.successes = 0;
        self.last_error = Some(error);
        self.caveat = None;
        if self.unconfirmed || self.failures >= fall {
            self.up = false;
            // A node that is down leads nothing the engine would tell us of.
            self.engine_leader = None;
        }
        self.unconfirmed = false;
    }

    /// Up, but its latest probe failed: on the way down unless the next probes succeed.
    pub fn failing(&self) -> bool {
        self.up && self.failures > 0
    }

    /// Down, but its latest probe succeeded: on the way up.
    pub fn rising(&self) -> bool {
        !self.up && self.successes > 0
    }
}

/// The outcome of an election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Election {
    pub leader: Option<usize>,
    pub conflict: bool,
}

/// Elects the leader among `nodes` (in priority order): the one up node with role
/// [`Role::Leader`]; two or more of them are a conflict (no leader). Without an exclusive
/// leader, the nodes with [`Role::SharedLeader`] may all lead: the current leader `current`
/// keeps the role while it is one of them, else the first in priority order takes it.
pub fn elect(nodes: &[NodeState], current: Option<usize>) -> Election {
    let mut exclusive = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.up && n.role == Role::Leader)
        .map(|(i, _)| i);
    match (exclusive.next(), exclusive.next()) {
        (Some(_), Some(_)) => {
            return Election {
                leader: None,
                conflict: true,
            }
        }
        (Some(i), None) => {
            return Election {
                leader: Some(i),
                conflict: false,
            }
        }
        _ => {}
    }
    let shared = |i: &usize| {
        nodes
            .get(*i)
            .is_some_and(|n| n.up && n.role == Role::SharedLeader)
    };
    let leader = current
        .filter(shared)
        .or_else(|| (0..nodes.len()).find(shared));
    Election {
        leader,
        conflict: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(up: bool, role: Role) -> NodeState {
        NodeState {
            up,
            role,
            unconfirmed: false,
            ..NodeState::default()
        }
    }

    #[test]
    fn first_result_decides_at_once() {
        let mut n = NodeState::default();
        assert!(n.up);
        n.failure("refused".into(), 3);
        assert!(
            !n.up,
            "a node down at start-up is not routed to for fall intervals"
        );

        let mut n = NodeState::default();
        n.success(Role::Leader, 2);
        assert!(n.up);
        assert_eq!(n.role, Role::Leader);
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let mut n = NodeState::default();
        n.success(Role::Replica, 2);
        for i in 1..3 {
            n.failure(format!("timeout {i}"), 3);
            assert!(n.up, "still up after {i} failures");
            assert!(n.failing());
        }
        n.success(Role::Replica, 2);
        assert_eq!(n.failures, 0, "a success resets the failures");
        for _ in 0..3 {
            n.failure("refused".into(), 3);
        }
        assert!(!n.up);
        assert_eq!(n.last_error.as_deref(), Some("refused"));

        n.success(Role::Replica, 2);
        assert!(!n.up && n.rising());
        n.failure("refused".into(), 3);
        n.success(Role::Replica, 2);
        assert!(!n.up, "a failure in between restarts the rise");
        n.success(Role::Replica, 2);
        assert!(n.up);
        assert_eq!(n.last_error, None);
    }

    #[test]
    fn engine_leadership_is_forgotten_when_the_node_goes_down() {
        let mut n = node(true, Role::SharedLeader);
        n.engine_leader = Some(true);
        n.failure("refused".into(), 2);
        assert_eq!(n.engine_leader, Some(true), "still up: kept like the role");
        n.failure("refused".into(), 2);
        assert!(!n.up);
        assert_eq!(n.engine_leader, None);
    }

    #[test]
    fn a_busy_leader_keeps_its_role_and_stays_up() {
        let mut n = node(true, Role::Leader);
        n.engine_leader = Some(true);
        for _ in 0..5 {
            n.alive(Probed::busy(), 2);
        }
        assert_eq!(n.engine_leader, Some(true), "kept while busy");
        assert!(n.up);
        assert_eq!(n.role, Role::Leader);
        assert_eq!(n.caveat, Some(Caveat::Busy));
        assert_eq!(elect(&[n.clone()], Some(0)).leader, Some(0));
        n.alive(Role::Leader.into(), 2);
        assert_eq!(n.caveat, None, "cleared once the node answers normally");
        assert_eq!(n.engine_leader, None, "taken from the normal answer");

        // A node whose first answer is -BUSY is alive, its role still unknown: it leads nothing.
        let mut n = NodeState::default();
        n.alive(Probed::busy(), 2);
        assert!(n.up);
        assert_eq!(n.role, Role::Unknown);

        let mut n = node(true, Role::Leader);
        n.alive(
            Probed {
                caveat: Some(Caveat::Misconf),
                ..Role::Leader.into()
            },
            2,
        );
        assert_eq!((n.role, n.caveat), (Role::Leader, Some(Caveat::Misconf)));
        n.failure("timeout".into(), 3);
        assert_eq!(n.caveat, None);
    }

    #[test]
    fn promotion_applies_on_the_next_probe() {
        let mut n = node(true, Role::Replica);
        n.successes = 10;
        n.success(Role::Leader, 2);
        assert_eq!(n.role, Role::Leader);
        assert!(n.up);
    }

    #[test]
    fn a_failing_leader_keeps_its_role_until_fall() {
        let mut n = node(true, Role::Leader);
        n.failure("timeout".into(), 2);
        assert_eq!(elect(&[n.clone()], None).leader, Some(0));
        n.failure("timeout".into(), 2);
        assert_eq!(elect(&[n], None).leader, None);
    }

    #[test]
    fn one_leader_is_elected() {
        let nodes = [node(true, Role::Replica), node(true, Role::Leader)];
        assert_eq!(
            elect(&nodes, None),
            Election {
                leader: Some(1),
                conflict: false
            }
        );
    }

    #[test]
    fn a_down_leader_is_not_elected() {
        let nodes = [node(false, Role::Leader), node(true, Role::Replica)];
        assert_eq!(elect(&nodes, Some(0)).leader, None);
    }

    #[test]
    fn two_leaders_are_a_conflict() {
        let nodes = [
            node(true, Role::Leader),
            node(true, Role::Leader),
            node(true, Role::Replica),
        ];
        assert_eq!(
            elect(&nodes, Some(0)),
            Election {
                leader: None,
                conflict: true
            }
        );
        // A down second leader is no conflict.
        let nodes = [node(true, Role::Leader), node(false, Role::Leader)];
        assert_eq!(elect(&nodes, None).leader, Some(0));
    }

    #[test]
    fn shared_leaders_keep_the_current_one() {
        let nodes = [
            node(true, Role::SharedLeader),
            node(true, Role::SharedLeader),
        ];
        assert_eq!(elect(&nodes, None).leader, Some(0));
        assert_eq!(elect(&nodes, Some(1)).leader, Some(1));
        let nodes = [
            node(true, Role::SharedLeader),
            node(false, Role::SharedLeader),
        ];
        assert_eq!(elect(&nodes, Some(1)).leader, Some(0));
        assert!(!elect(&nodes, Some(1)).conflict);
    }

    #[test]
    fn unknown_roles_never_lead() {
        let nodes = [node(true, Role::Unknown), node(true, Role::Replica)];
        assert_eq!(elect(&nodes, None).leader, None);
        assert!(!elect(&nodes, None).conflict);
    }
}
