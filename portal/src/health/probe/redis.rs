//! The Redis probe (also KeyDB and Valkey): AUTH, PING, ROLE (or INFO replication). Beside
//! the role, the replication: a master's offset (`master_repl_offset`), a replica's offset and
//! whether its link to the master is up (ROLE's state `connected`, INFO's
//! `master_link_status:up`); a replica whose link is down is broken, whatever its offset.
//!
//! A hand-written RESP exchange: the probe needs four commands and the replies' first words,
//! which a full client crate (connection managers, pools, a wide type system) would not make
//! clearer, only heavier.
//!
//! May import: `wire` (RESP) and the rest of `health`.

use tokio::io::{AsyncWriteExt, BufReader};

use super::{Io, ProbeError, Probed};
use crate::{
    health::{Caveat, ProbeCredentials, Replication, Role},
    wire::resp::{encode, read_reply, Reply, RespError},
};

impl From<RespError> for ProbeError {
    fn from(e: RespError) -> Self {
        match e {
            RespError::Io(e) => ProbeError::Io(e),
            RespError::Protocol(m) => ProbeError::Protocol(m),
        }
    }
}

pub(crate) async fn probe(
    stream: &mut Box<dyn Io>,
    credentials: Option<&ProbeCredentials>,
) -> Result<Probed, ProbeError> {
    let mut request = Vec::new();
    if let Some(c) = credentials {
        match &c.username {
            Some(user) => encode(&mut request, &["AUTH", user, &c.password]),
            None => encode(&mut request, &["AUTH", &c.password]),
        }
    }
    encode(&mut request, &["PING"]);
    encode(&mut request, &["ROLE"]);
    stream.write_all(&request).await?;
    let mut reader = BufReader::new(stream);

    if credentials.is_some() {
        match read_reply(&mut reader).await? {
            Reply::Simple(_) => {}
            Reply::Error(e) => {
                return Err(ProbeError::Auth(e));
            }
            other => return Err(unexpected("AUTH", &other)),
        }
    }
    let caveat = match read_reply(&mut reader).await? {
        Reply::Simple(s) if s.eq_ignore_ascii_case("PONG") => None,
        Reply::Error(e) => match caveat_of(&e) {
            Some(Caveat::Busy) => {
                // ROLE gets -BUSY too; read it so that the exchange ends cleanly.
                let _ = read_reply(&mut reader).await;
                return Ok(Probed::busy());
            }
            Some(c) => Some(c),
            None => return Err(error_reply("PING", e)),
        },
        other => return Err(unexpected("PING", &other)),
    };
    let (role, replication) = match read_reply(&mut reader).await? {
        Reply::Array(Some(items)) => from_role(&items),
        // A script started between PING and ROLE.
        Reply::Error(e) if caveat_of(&e) == Some(Caveat::Busy) => return Ok(Probed::busy()),
        // ROLE unknown (renamed, an old server) or not permitted (ACL): ask INFO instead.
        Reply::Error(e) if e.starts_with("LOADING") => Err(ProbeError::Loading),
        Reply::Error(_) => {
            let mut request = Vec::new();
            encode(&mut request, &["INFO", "replication"]);
            reader.get_mut().write_all(&request).await?;
            match read_reply(&mut reader).await? {
                Reply::Bulk(Some(info)) => from_info(&String::from_utf8_lossy(&info)),
                Reply::Error(e) if caveat_of(&e) == Some(Caveat::Busy) => return Ok(Probed::busy()),
                Reply::Error(e) => Err(error_reply("INFO replication", e)),
                other => Err(unexpected("INFO replication", &other)),
            }
        }
        other => Err(unexpected("ROLE", &other)),
    }?;
    Ok(Probed {
        caveat,
        replication,
        ..role.into()
    })
}

/// Why a replica counts as not replicating.
const LINK_DOWN: &str = "the link to the master is down";

/// The role and replication from ROLE's answer: `[master, offset, replicas]` or
/// `[slave, host, port, state, offset]`.
fn from_role(items: &[Reply]) -> Result<(Role, Replication), ProbeError> {
    let text = |r: Option<&Reply>| match r {
        Some(Reply::Bulk(Some(b))) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(Reply::Simple(s)) => Some(s.clone()),
        _ => None,
    };
    let int = |r: Option<&Reply>| match r {
        Some(Reply::Integer(n)) => u64::try_from(*n).ok(),
        other => text(other).and_then(|t| t.parse().ok()),
    };
    let Some(name) = text(items.first()) else {
        return Err(ProbeError::Protocol(format!(
            "ROLE answered an array without a role: {items:?}"
        )));
    };
    let role = role_of(&name)?;
    let replication = match role {
        Role::Leader => Replication {
            position: int(items.get(1)),
            ..Replication::default()
        },
        Role::Replica => Replication {
            position: int(items.get(4)),
            lag: None,
            broken: (text(items.get(3)).as_deref() != Some("connected")).then_some(LINK_DOWN),
        },
        _ => Replication::default(),
    };
    Ok((role, replication))
}

/// The role and replication from `INFO replication`.
fn from_info(info: &str) -> Result<(Role, Replication), ProbeError> {
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    };
    let role = role_of(
        field("role")
            .ok_or_else(|| ProbeError::Protocol("INFO replication has no role: line".into()))?,
    )?;
    let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
    let replication = match role {
        Role::Leader => Replication {
            position: number("master_repl_offset"),
            ..Replication::default()
        },
        Role::Replica => Replication {
            position: number("slave_repl_offset"),
            lag: None,
            broken: (field("master_link_status") != Some("up")).then_some(LINK_DOWN),
        },
        _ => Replication::default(),
    };
    Ok((role, replication))
}

/// The error replies that mean "alive, with a caveat" rather than "down". Each reply the probe
/// can meet is decided on purpose:
/// - `-BUSY`: a long script or function; the node is alive and keeps its role (see
///   [`Caveat::Busy`]).
/// - `-MISCONF`: cannot persist, refuses writes and PING; still the leader, reads work.
/// - `-LOADING`: not here: the node cannot serve until its data set is loaded (down).
/// - `-MASTERDOWN`: not here: a replica with `replica-serve-stale-data no` that has lost its
///   master refuses reads, so it is down for the modes that read from replicas (it never leads).
/// - `-NOAUTH` / `-WRONGPASS`: not here: a credentials problem, reported as such.
fn caveat_of(error: &str) -> Option<Caveat> {
    if error.starts_with("BUSY ") || error == "BUSY" {
        Some(Caveat::Busy)
    } else if error.starts_with("MISCONF") {
        Some(Caveat::Misconf)
    } else {
        None
    }
}

fn role_of(role: &str) -> Result<Role, ProbeError> {
    match role.trim() {
        "master" => Ok(Role::Leader),
        "active-replica" => Ok(Role::SharedLeader),
        "slave" | "replica" => Ok(Role::Replica),
        other => Err(ProbeError::Protocol(format!(
            "unexpected role {other:?} (a sentinel?)"
        ))),
    }
}

fn error_reply(command: &str, error: String) -> ProbeError {
    if error.starts_with("LOADING") {
        ProbeError::Loading
    } else if error.starts_with("NOAUTH") || error.starts_with("WRONGPASS") {
        ProbeError::Auth(error)
    } else if error.starts_with("MASTERDOWN") {
        ProbeError::Protocol(format!(
            "{command} answered -{error} (a replica that lost its master and does not serve \
             stale data: down until it resynchronises)"
        ))
    } else {
        ProbeError::Protocol(format!("{command} answered -{error}"))
    }
}

fn unexpected(command: &str, reply: &Reply) -> ProbeError {
    ProbeError::Protocol(format!("{command} answered {reply:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        assert_eq!(role_of("master"), Ok(Role::Leader));
        assert_eq!(role_of("slave"), Ok(Role::Replica));
        assert_eq!(role_of("active-replica"), Ok(Role::SharedLeader));
        assert!(role_of("sentinel").is_err());
        assert_eq!(
            error_reply("PING", "LOADING Redis is loading".into()),
            ProbeError::Loading
        );
        assert_eq!(
            caveat_of("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
            Some(Caveat::Busy)
        );
        assert_eq!(caveat_of("BUSYKEY Target key name already exists."), None);
        assert_eq!(
            caveat_of("MISCONF Redis is configured to save RDB snapshots"),
            Some(Caveat::Misconf)
        );
        assert_eq!(caveat_of("MASTERDOWN Link with MASTER is down"), None);
        assert!(matches!(
            error_reply("PING", "NOAUTH Authentication required.".into()),
            ProbeError::Auth(_)
        ));
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn reads_replication_from_role_and_info() {
        let master = [
            bulk("master"),
            Reply::Integer(3129),
            Reply::Array(Some(vec![])),
        ];
        let (role, r) = from_role(&master).unwrap();
        assert_eq!(
            (role, r.position, r.broken),
            (Role::Leader, Some(3129), None)
        );
        let replica = |state: &str| {
            [
                bulk("slave"),
                bulk("127.0.0.1"),
                Reply::Integer(6380),
                bulk(state),
                Reply::Integer(3100),
            ]
        };
        let (role, r) = from_role(&replica("connected")).unwrap();
        assert_eq!(
            (role, r.position, r.broken),
            (Role::Replica, Some(3100), None)
        );
        assert_eq!(
            from_role(&replica("connecting")).unwrap().1.broken,
            Some(LINK_DOWN)
        );

        let info =
            "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nslave_repl_offset:42\r\n";
        let (role, r) = from_info(info).unwrap();
        assert_eq!(
            (role, r.position, r.broken),
            (Role::Replica, Some(42), None)
        );
        let info = "role:slave\r\nmaster_link_status:down\r\nslave_repl_offset:42\r\n";
        assert_eq!(from_info(info).unwrap().1.broken, Some(LINK_DOWN));
        let info = "role:master\r\nmaster_repl_offset:99\r\n";
        assert_eq!(from_info(info).unwrap().1.position, Some(99));
        assert!(from_info("connected_slaves:0").is_err());
    }
}
