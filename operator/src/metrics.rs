//! Prometheus metrics of the operator: reconciles, failures by error kind (the `Error`
//! variant's name), reconcile duration, child applies and status writes sent or skipped,
//! leadership.
//!
//! May import: `error`, `track` (the child kinds it counts by).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::track::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    /// `sent`, or `skipped` (nothing changed since the last one).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplyLabels {
    /// The child's kind (`ConfigMap`, `Service`, ...).
    kind: &'static str,
    /// `sent`, or `skipped` (nothing changed since the last one).
    result: &'static str,
}

fn result(sent: bool) -> WriteLabels {
    WriteLabels {
        result: if sent { "sent" } else { "skipped" },
    }
}

/// The operator's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    applies: Family<ApplyLabels, Counter>,
    status_writes: Family<WriteLabels, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dbportal_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::default();
        let applies = Family::<ApplyLabels, Counter>::default();
        let status_writes = Family::<WriteLabels, Counter>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "child_applies",
            "Server-side applies of children, sent or skipped (unchanged since the last one)",
            applies.clone(),
        );
        registry.register(
            "status_writes",
            "DatabasePortal status writes, sent or skipped (unchanged)",
            status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader-election lease (or runs without election)",
            leader.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            failures,
            duration,
            applies,
            status_writes,
            leader,
        }
    }
}

impl Metrics {
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_finished(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failure(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    pub fn failures(&self, label: &'static str) -> u64 {
        self.failures
            .get_or_create(&ErrorLabels { error: label })
            .get()
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    pub fn child_apply(&self, kind: Kind, sent: bool) {
        self.applies
            .get_or_create(&ApplyLabels {
                kind: kind.as_str(),
                result: result(sent).result,
            })
            .inc();
    }

    pub fn status_write(&self, sent: bool) {
        self.status_writes.get_or_create(&result(sent)).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(leader as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_labelled_by_error_variant() {
        let m = Metrics::default();
        m.reconcile_started();
        m.failure(&Error::InvalidSpec(vec![]));
        m.failure(&Error::MissingObjectKey("uid"));
        m.reconcile_finished(Duration::from_millis(3));
        m.child_apply(Kind::Service, true);
        m.child_apply(Kind::Service, false);
        m.child_apply(Kind::Service, false);
        m.child_apply(Kind::ConfigMap, false);
        m.status_write(false);
        let text = m.encode();
        assert!(
            text.contains(
                r#"dbportal_operator_child_applies_total{kind="Service",result="skipped"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"dbportal_operator_status_writes_total{result="skipped"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("dbportal_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"dbportal_operator_reconcile_failures_total{error="InvalidSpec"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"dbportal_operator_reconcile_failures_total{error="MissingObjectKey"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("dbportal_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
