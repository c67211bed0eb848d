//! Test fixtures that chain: `portal("orders").with_tls_disabled().with_replicas(3)`.
//!
//! Tests sit on top of every layer and may import any module.

use crate::DatabasePortal;

/// The contract's example, as a user would apply it, plus what the server adds.
pub const ORDERS: &str = r#"
apiVersion: dbportal.dev/v1alpha1
kind: DatabasePortal
metadata:
  name: orders
  namespace: shop
  uid: 6f1c2c5e-0000-4000-8000-000000000001
  generation: 1
spec:
  engine: redis
  backends:
    - {name: orders-0, address: "orders-0.orders-db.shop.svc:6379"}
    - {name: orders-1, address: "orders-1.orders-db.shop.svc:6379"}
  allowedCIDRs: ["10.0.0.0/8", "2001:db8::/32"]
  tls:
    mode: terminate
    issuerRef: {name: letsencrypt, kind: ClusterIssuer}
    dnsNames: [orders.example.com]
"#;

pub fn orders() -> DatabasePortal {
    serde_norway::from_str(ORDERS).unwrap()
}

/// Parses a DatabasePortal from inline YAML.
pub fn from_yaml(text: &str) -> DatabasePortal {
    serde_norway::from_str(text).unwrap()
}

/// Chaining helpers on the (foreign) DatabasePortal type.
pub trait PortalFixture: Sized {
    fn patch_spec(self, yaml: &str) -> Self;
    fn with_replicas(self, n: i32) -> Self;
    fn with_tls_disabled(self) -> Self;
    fn with_tls_secret(self, secret: &str) -> Self;
    fn with_generation(self, g: i64) -> Self;
}

impl PortalFixture for DatabasePortal {
    fn patch_spec(mut self, yaml: &str) -> Self {
        let mut spec = serde_json::to_value(&self.spec).unwrap();
        let patch: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        merge(&mut spec, patch);
        self.spec = serde_json::from_value(spec).unwrap();
        self
    }
    fn with_replicas(self, n: i32) -> Self {
        self.patch_spec(&format!("portal: {{replicas: {n}}}"))
    }
    fn with_tls_disabled(self) -> Self {
        let mut me = self;
        me.spec.tls = Default::default();
        me.patch_spec("tls: {mode: disabled}")
    }
    fn with_tls_secret(self, secret: &str) -> Self {
        let mut me = self;
        me.spec.tls = Default::default();
        me.patch_spec(&format!("tls: {{secretName: {secret}}}"))
    }
    fn with_generation(mut self, g: i64) -> Self {
        self.metadata.generation = Some(g);
        self
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}
