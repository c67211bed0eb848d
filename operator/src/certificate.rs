//! cert-manager's `Certificate` (cert-manager.io/v1), typed by hand with only the fields the
//! operator sets or reads; `tests::fields_match_the_real_crd` pins it to cert-manager's CRD.
//!
//! May import: nothing of the crate.

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The part of a cert-manager Certificate's spec that the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "Certificate",
    plural = "certificates",
    namespaced,
    status = "CertificateStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    /// The Secret cert-manager writes the key pair to.
    pub secret_name: String,
    /// Subject alternative names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Who signs.
    pub issuer_ref: CertificateIssuerRef,
    /// Labels cert-manager puts on the Secret, so it is recognisably ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,
}

/// Reference to an Issuer or ClusterIssuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CertificateIssuerRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Metadata for the Secret cert-manager creates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What the operator reads back from a Certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CertificateStatus {
    #[serde(default)]
    pub conditions: Vec<CertificateCondition>,
}

/// A condition cert-manager sets (`Ready` is the one that matters).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CertificateCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Certificate {
    /// True when cert-manager reports the certificate issued and current.
    pub fn is_ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::Value;

    const CRD: &str = include_str!("../tests/fixtures/cert-manager.io_certificates.yaml");

    fn v1_schema() -> Value {
        let crd: Value = serde_norway::from_str(CRD).unwrap();
        assert_eq!(crd["spec"]["group"], Certificate::group(&()).as_ref());
        assert_eq!(
            crd["spec"]["names"]["kind"],
            Certificate::kind(&()).as_ref()
        );
        assert_eq!(
            crd["spec"]["names"]["plural"],
            Certificate::plural(&()).as_ref()
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == Certificate::version(&()).as_ref())
            .expect("the CRD serves v1")
            .clone();
        assert_eq!(version["served"], true);
        version["schema"]["openAPIV3Schema"].clone()
    }

    /// Every field in `value` exists in `schema` with the same JSON type.
    fn check(value: &Value, schema: &Value, path: &str) {
        let ty = schema["type"].as_str().unwrap_or("");
        match value {
            Value::Object(map) => {
                assert_eq!(ty, "object", "{path} is not an object in the CRD");
                if let Some(required) = schema["required"].as_array() {
                    for r in required {
                        let r = r.as_str().unwrap();
                        assert!(map.contains_key(r), "{path}.{r} is required by the CRD");
                    }
                }
                for (key, v) in map {
                    let sub = if let Some(s) = schema["properties"].get(key) {
                        s
                    } else {
                        schema
                            .get("additionalProperties")
                            .filter(|s| s.is_object())
                            .unwrap_or_else(|| panic!("{path}.{key} is not in the CRD"))
                    };
                    check(v, sub, &format!("{path}.{key}"));
                }
            }
            Value::Array(items) => {
                assert_eq!(ty, "array", "{path} is not an array in the CRD");
                for (i, item) in items.iter().enumerate() {
                    check(item, &schema["items"], &format!("{path}[{i}]"));
                }
            }
            Value::String(s) => {
                assert_eq!(ty, "string", "{path} is not a string in the CRD");
                if let Some(options) = schema["enum"].as_array() {
                    assert!(options.iter().any(|o| o == s), "{path}: {s} not allowed");
                }
            }
            Value::Bool(_) => assert_eq!(ty, "boolean", "{path}"),
            Value::Number(_) => assert!(ty == "integer" || ty == "number", "{path}"),
            Value::Null => panic!("{path}: null"),
        }
    }

    #[test]
    fn fields_match_the_real_crd() {
        let schema = v1_schema();
        let cert = Certificate {
            metadata: Default::default(),
            spec: CertificateSpec {
                secret_name: "orders-portal-tls".into(),
                dns_names: vec!["orders-portal".into()],
                issuer_ref: CertificateIssuerRef {
                    name: "letsencrypt".into(),
                    kind: Some("ClusterIssuer".into()),
                    group: Some("cert-manager.io".into()),
                },
                secret_template: Some(SecretTemplate {
                    labels: [("app.kubernetes.io/name".to_string(), "dbportal".to_string())].into(),
                }),
            },
            status: Some(CertificateStatus {
                conditions: vec![CertificateCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: Some("Ready".into()),
                    message: Some("issued".into()),
                }],
            }),
        };
        let value = serde_json::to_value(&cert).unwrap();
        check(&value["spec"], &schema["properties"]["spec"], "spec");
        check(&value["status"], &schema["properties"]["status"], "status");
        assert!(cert.is_ready());
    }

    #[test]
    fn a_minimal_certificate_has_every_required_field() {
        let schema = v1_schema();
        let value = serde_json::to_value(CertificateSpec {
            secret_name: "s".into(),
            issuer_ref: CertificateIssuerRef {
                name: "i".into(),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        check(&value, &schema["properties"]["spec"], "spec");
    }
}
