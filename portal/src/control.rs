//! Runtime control of backends: the state (`ready`, `drain`, `maint`) and weight that the
//! admin endpoint sets on a backend, over what the configuration says. Overrides are keyed by
//! backend name, so they outlive configuration reloads (a backend removed and added back finds
//! its override again) until they are cleared; readers take an `Arc` snapshot, published on
//! each change, so routing a session costs one reference count.
//!
//! May import: `config`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::sync::watch;

use crate::config::{Backend, BackendState};

/// What the admin endpoint set on one backend; `None` = the configuration's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Override {
    pub state: Option<BackendState>,
    pub weight: Option<u32>,
    /// When it was last set.
    pub since: Option<SystemTime>,
}

/// The overrides in force, by backend name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides(BTreeMap<String, Override>);

impl Overrides {
    pub fn get(&self, name: &str) -> Override {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// The state `backend` is in: the override, else the configuration's.
    pub fn state(&self, backend: &Backend) -> BackendState {
        self.get(&backend.name).state.unwrap_or(backend.state)
    }

    /// The weight `backend` has: the override, else the configuration's.
    pub fn weight(&self, backend: &Backend) -> u32 {
        self.get(&backend.name).weight.unwrap_or(backend.weight)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Override)> {
        self.0.iter()
    }
}

/// The portal's runtime overrides: set by the admin endpoint, read by routing, status and
/// reports. Clones share the same overrides.
#[derive(Clone, Debug)]
pub struct Control {
    lock: Arc<Mutex<()>>,
    tx: Arc<watch::Sender<Arc<Overrides>>>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            lock: Arc::default(),
            tx: Arc::new(watch::channel(Arc::new(Overrides::default())).0),
        }
    }
}

impl Control {
    /// The overrides in force.
    pub fn current(&self) -> Arc<Overrides> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees each change (for the session registry and reports).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Overrides>> {
        self.tx.subscribe()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Override)) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**self.tx.borrow()).clone();
        let entry = next.0.entry(name.to_string()).or_default();
        f(entry);
        entry.since = Some(SystemTime::now());
        if entry.state.is_none() && entry.weight.is_none() {
            next.0.remove(name);
        }
        self.tx.send_replace(Arc::new(next));
    }

    /// Sets the runtime state of `name`; `None` clears it (the configuration's applies).
    pub fn set_state(&self, name: &str, state: Option<BackendState>) {
        self.update(name, |o| o.state = state);
    }

    /// Sets the runtime weight of `name`; `None` clears it.
    pub fn set_weight(&self, name: &str, weight: Option<u32>) {
        self.update(name, |o| o.weight = weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(state: BackendState, weight: u32) -> Backend {
        Backend {
            name: "b0".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            weight,
            backup: false,
            max_connections: 0,
            slow_start: std::time::Duration::ZERO,
            state,
        }
    }

    #[test]
    fn overrides_win_over_the_configuration_until_cleared() {
        let control = Control::default();
        let b = backend(BackendState::Drain, 3);
        assert_eq!(control.current().state(&b), BackendState::Drain);
        assert_eq!(control.current().weight(&b), 3);
        let mut rx = control.subscribe();
        control.set_state("b0", Some(BackendState::Ready));
        control.set_weight("b0", Some(7));
        assert!(rx.has_changed().unwrap());
        let now = rx.borrow_and_update().clone();
        assert_eq!(now.state(&b), BackendState::Ready);
        assert_eq!(now.weight(&b), 7);
        assert!(now.get("b0").since.is_some());
        control.set_state("b0", None);
        assert_eq!(control.current().state(&b), BackendState::Drain);
        assert_eq!(control.current().weight(&b), 7);
        control.set_weight("b0", None);
        assert_eq!(
            control.current().iter().count(),
            0,
            "a cleared entry is removed"
        );
    }
}
