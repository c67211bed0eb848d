//! Health and role of the backends: the view the health checker publishes through a `watch`
//! channel and the data plane routes by.

/// The role a probe reported for a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Not probed yet, or the engine has no notion of role (tcp, etcd members).
    #[default]
    Unknown,
    /// The node accepts writes.
    Leader,
    /// A healthy node that does not accept writes.
    Replica,
}

/// What is known of one backend, in the order of the configuration's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub name: String,
    /// Routable: marked up by `rise` successes (or assumed up before any probe).
    pub up: bool,
    pub role: Role,
    /// Why the latest probe failed, if it did.
    pub last_error: Option<String>,
}

/// The checker's view of all backends.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HealthView {
    pub backends: Vec<BackendHealth>,
    /// Index of the one healthy node that leads; `None` when there is none, or several claim
    /// to lead (`conflict`).
    pub leader: Option<usize>,
    /// More than one healthy node claims to be the leader: route to neither.
    pub conflict: bool,
}

impl HealthView {
    /// The view before any probe ran: every node up, no role known.
    pub fn assume_up<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        HealthView {
            backends: names
                .into_iter()
                .map(|name| BackendHealth {
                    name: name.to_string(),
                    up: true,
                    role: Role::Unknown,
                    last_error: None,
                })
                .collect(),
            leader: None,
            conflict: false,
        }
    }

    /// Health of the backend named `name`, if the view knows it.
    pub fn get(&self, name: &str) -> Option<&BackendHealth> {
        self.backends.iter().find(|b| b.name == name)
    }
}

/// Starts the health checker for the configurations published on `config` and returns the
/// channel its views are published on. The checker follows configuration changes and stops
/// when `config`'s sender is dropped.
pub fn spawn(
    mut config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
) -> tokio::sync::watch::Receiver<HealthView> {
    let view_of = |c: &crate::config::Config| {
        HealthView::assume_up(c.backends.iter().map(|b| b.name.as_str()))
    };
    let (tx, rx) = tokio::sync::watch::channel(view_of(&config.borrow_and_update()));
    tokio::spawn(async move {
        while config.changed().await.is_ok() {
            let view = view_of(&config.borrow_and_update());
            if tx.send(view).is_err() {
                break;
            }
        }
    });
    rx
}
