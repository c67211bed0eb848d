//! The operator's own certificate, for a DatabasePortal that terminates TLS (the default) and
//! names neither `tls.issuerRef` nor `tls.secretName`: a fresh cluster needs no cert-manager.
//!
//! Each such DatabasePortal gets its own CA, kept in the Secret `<name>-portal-ca` that only
//! the operator reads, and the portals serve a certificate that CA signs, in the
//! `kubernetes.io/tls` Secret `<name>-portal-tls` with the CA as `ca.crt`. Clients verify the
//! portals with that `ca.crt` (`redis-cli --tls --cacert`, `psql sslmode=verify-full
//! sslrootcert=`). The CA lasts ten years; the portals' certificate lasts a year and is
//! issued again under the same CA 30 days before it expires, when the DNS names change
//! (replicas, `tls.dnsNames`) or when its Secret was deleted or edited, so a client's copy of
//! `ca.crt` stays valid. Deciding is pure ([`plan`]); [`ensure`] reads and writes the Secrets.
//!
//! May import: `error`, `names`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tracing::info;

use crate::error::{Error, Result};
use crate::names::MANAGER;

/// Annotation on both Secrets: who made them.
pub const ISSUED_BY: &str = "dbportal.dev/issued-by";
/// Its value.
pub const ISSUER: &str = "dbportal-operator self-signed CA";
/// Lifetime of the CA.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the portals' certificate.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The portals' certificate is issued again when it has less than this left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Clocks of clients may lag behind the operator's.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The certificate the portals of one DatabasePortal need (built by `build`).
#[derive(Clone, Debug, PartialEq)]
pub struct SelfSigned {
    /// `<name>-portal-ca`: the CA's certificate and key.
    pub ca_secret: ObjectMeta,
    /// `<name>-portal-tls`: what the portals serve.
    pub tls_secret: ObjectMeta,
    /// The CA's common name, `<namespace>/<name> dbportal CA`.
    pub ca_name: String,
    /// The portal Services' DNS names and `tls.dnsNames`; the first is the common name.
    pub dns_names: Vec<String>,
}

/// What [`ensure`] has to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Both Secrets are current.
    Keep,
    /// Issue the portals' certificate (and first a new CA when `ca`), saying why.
    Issue { ca: bool, why: String },
    /// `<name>-portal-tls` exists and is someone else's: it is left alone.
    Foreign(String),
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

fn ours(secret: &Secret, owner_uid: &str) -> bool {
    let owned = secret
        .owner_references()
        .iter()
        .any(|o| o.uid == owner_uid && o.controller == Some(true));
    owned && secret.annotations().get(ISSUED_BY).map(String::as_str) == Some(ISSUER)
}

/// The DNS names in a PEM certificate's subjectAltName, and when it expires.
fn names_and_expiry(cert_pem: &[u8]) -> Option<(Vec<String>, SystemTime)> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let der = CertificateDer::pem_slice_iter(cert_pem).next()?.ok()?;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    let tbs = &cert.tbs_certificate;
    let not_after = UNIX_EPOCH + tbs.validity.not_after.to_unix_duration();
    let san = tbs
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == x509_cert::der::oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)?;
    let san = SubjectAltName::from_der(san.extn_value.as_bytes()).ok()?;
    let names = san
        .0
        .iter()
        .filter_map(|n| match n {
            GeneralName::DnsName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect();
    Some((names, not_after))
}

/// Decides from the two Secrets as read (None: absent) what to do. Pure, for tests.
pub fn plan(
    ca: Option<&Secret>,
    tls: Option<&Secret>,
    owner_uid: &str,
    wanted: &SelfSigned,
    now: SystemTime,
) -> Plan {
    if let Some(tls) = tls {
        if !ours(tls, owner_uid) {
            return Plan::Foreign(format!(
                "Secret {} exists and was not made by the operator for this DatabasePortal; \
                 name it in tls.secretName to serve it, or delete it",
                tls.name_any()
            ));
        }
    }
    let ca_pair = ca.filter(|s| ours(s, owner_uid)).and_then(|s| {
        let cert = data(s, "ca.crt")?;
        let key = std::str::from_utf8(data(s, "ca.key")?).ok()?;
        KeyPair::from_pem(key).ok().map(|_| cert)
    });
    let Some(ca_cert) = ca_pair else {
        return Plan::Issue {
            ca: true,
            why: "no CA yet".into(),
        };
    };
    let Some(tls) = tls else {
        return Plan::Issue {
            ca: false,
            why: "no certificate yet".into(),
        };
    };
    let issue = |why: &str| Plan::Issue {
        ca: false,
        why: why.into(),
    };
    if data(tls, "ca.crt") != Some(ca_cert) {
        return issue("its ca.crt is not the CA's");
    }
    let (Some(cert), Some(key)) = (data(tls, "tls.crt"), data(tls, "tls.key")) else {
        return issue("tls.crt or tls.key is missing");
    };
    if portal::tls::parse_pair(cert, key, now).is_err() {
        return issue("tls.crt and tls.key do not make a usable pair");
    }
    let Some((names, not_after)) = names_and_expiry(cert) else {
        return issue("tls.crt cannot be read");
    };
    if names != wanted.dns_names {
        return issue("the DNS names changed");
    }
    if not_after < now + RENEW_BEFORE {
        return issue("it expires within 30 days");
    }
    Plan::Keep
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The CA's parameters; the same whenever the CA signs, so the issuer of every certificate
/// it signs matches its subject.
fn ca_params(ca_name: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dbportal");
    dn.push(DnType::CommonName, ca_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + CA_LIFETIME);
    params
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Serialize {
        kind: "certificate",
        message: e.to_string(),
    }
}

/// A new CA: (certificate PEM, key PEM).
pub fn issue_ca(ca_name: &str, now: SystemTime) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = ca_params(ca_name, now)
        .self_signed(&key)
        .map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The portals' certificate for `dns_names`, signed by the CA: (certificate PEM, key PEM).
pub fn issue_leaf(
    ca_name: &str,
    ca_key_pem: &str,
    dns_names: &[String],
    now: SystemTime,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(rcgen_error)?;
    let issuer = Issuer::new(ca_params(ca_name, now), ca_key);
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(rcgen_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dbportal");
    dn.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + LEAF_LIFETIME);
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn secret(meta: &ObjectMeta, type_: &str, entries: &[(&str, &str)]) -> Secret {
    let mut meta = meta.clone();
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ISSUED_BY.into(), ISSUER.into());
    Secret {
        metadata: meta,
        type_: Some(type_.into()),
        data: Some(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Makes both Secrets current (see the module's rules). Returns what it did.
pub async fn ensure(client: &Client, owner_uid: &str, wanted: &SelfSigned) -> Result<Plan> {
    let ns = wanted.tls_secret.namespace.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let read = |name: Option<String>| {
        let api = api.clone();
        async move {
            let name = name.unwrap_or_default();
            api.get_opt(&name).await.map_err(|source| Error::Apply {
                kind: "Secret".into(),
                name,
                source,
            })
        }
    };
    let (ca, tls) = futures::try_join!(
        read(wanted.ca_secret.name.clone()),
        read(wanted.tls_secret.name.clone())
    )?;
    let now = SystemTime::now();
    let decided = plan(ca.as_ref(), tls.as_ref(), owner_uid, wanted, now);
    let Plan::Issue { ca: new_ca, why } = &decided else {
        return Ok(decided);
    };
    let write = |s: Secret| {
        let api = api.clone();
        async move {
            let name = s.name_any();
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&s),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: "Secret".into(),
                name,
                source,
            })
        }
    };
    let (ca_cert, ca_key) = match ca.as_ref().filter(|_| !new_ca) {
        Some(s) => (
            String::from_utf8_lossy(data(s, "ca.crt").unwrap_or_default()).into_owned(),
            String::from_utf8_lossy(data(s, "ca.key").unwrap_or_default()).into_owned(),
        ),
        None => {
            let (cert, key) = issue_ca(&wanted.ca_name, now)?;
            write(secret(
                &wanted.ca_secret,
                "Opaque",
                &[("ca.crt", &cert), ("ca.key", &key)],
            ))
            .await?;
            (cert, key)
        }
    };
    let (cert, key) = issue_leaf(&wanted.ca_name, &ca_key, &wanted.dns_names, now)?;
    write(secret(
        &wanted.tls_secret,
        "kubernetes.io/tls",
        &[("tls.crt", &cert), ("tls.key", &key), ("ca.crt", &ca_cert)],
    ))
    .await?;
    info!(
        secret = %wanted.tls_secret.name.as_deref().unwrap_or_default(),
        namespace = %ns,
        new_ca,
        why = %why,
        "issued the portals' certificate from the DatabasePortal's own CA"
    );
    Ok(decided)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    const UID: &str = "u1";

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            owner_references: Some(vec![OwnerReference {
                uid: UID.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn wanted(names: &[&str]) -> SelfSigned {
        SelfSigned {
            ca_secret: meta("cache-portal-ca"),
            tls_secret: meta("cache-portal-tls"),
            ca_name: "shop/cache dbportal CA".into(),
            dns_names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// Both Secrets as `ensure` writes them, issued at `at`.
    fn issued(w: &SelfSigned, at: SystemTime) -> (Secret, Secret) {
        let (ca_cert, ca_key) = issue_ca(&w.ca_name, at).unwrap();
        let (cert, key) = issue_leaf(&w.ca_name, &ca_key, &w.dns_names, at).unwrap();
        (
            secret(
                &w.ca_secret,
                "Opaque",
                &[("ca.crt", &ca_cert), ("ca.key", &ca_key)],
            ),
            secret(
                &w.tls_secret,
                "kubernetes.io/tls",
                &[("tls.crt", &cert), ("tls.key", &key), ("ca.crt", &ca_cert)],
            ),
        )
    }

    fn issue(ca: bool) -> impl Fn(&Plan) -> bool {
        move |p| matches!(p, Plan::Issue { ca: c, .. } if *c == ca)
    }

    #[test]
    fn the_certificate_verifies_against_the_ca_for_every_name() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let w = wanted(&["cache-portal.shop.svc", "cache-portal-0.shop.svc"]);
        let now = SystemTime::now();
        let (ca, tls) = issued(&w, now);
        let der = |pem: &[u8]| -> CertificateDer<'static> {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(pem).unwrap()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(data(&ca, "ca.crt").unwrap())).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let leaf = der(data(&tls, "tls.crt").unwrap());
        let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap());
        for name in &w.dns_names {
            let server = ServerName::try_from(name.clone()).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server, &[], at)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("elsewhere.shop.svc").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf, &[], &other, &[], at)
            .is_err());
        // The portal itself accepts the pair.
        portal::tls::parse_pair(
            data(&tls, "tls.crt").unwrap(),
            data(&tls, "tls.key").unwrap(),
            now,
        )
        .unwrap();
    }

    #[test]
    fn a_current_pair_is_kept_and_anything_else_is_issued() {
        let w = wanted(&["cache-portal.shop.svc", "cache-portal"]);
        let now = SystemTime::now();
        let (ca, tls) = issued(&w, now);
        assert_eq!(plan(Some(&ca), Some(&tls), UID, &w, now), Plan::Keep);
        // Nothing yet, or the CA lost: a new CA first.
        assert!(issue(true)(&plan(None, None, UID, &w, now)));
        assert!(issue(true)(&plan(None, Some(&tls), UID, &w, now)));
        // The certificate deleted: issued again under the same CA.
        assert!(issue(false)(&plan(Some(&ca), None, UID, &w, now)));
        // A DNS name more (a third portal).
        let more = wanted(&["cache-portal.shop.svc", "cache-portal", "cache-portal-2"]);
        assert!(issue(false)(&plan(Some(&ca), Some(&tls), UID, &more, now)));
        // 30 days before it expires.
        let late = now + LEAF_LIFETIME - RENEW_BEFORE + Duration::from_secs(60);
        assert!(issue(false)(&plan(Some(&ca), Some(&tls), UID, &w, late)));
        let early = now + LEAF_LIFETIME - RENEW_BEFORE - Duration::from_secs(3600);
        assert_eq!(plan(Some(&ca), Some(&tls), UID, &w, early), Plan::Keep);
        // Signed by another CA (a second operator's CA, a hand edit).
        let (other_ca, _) = issued(&w, now);
        assert!(issue(false)(&plan(
            Some(&other_ca),
            Some(&tls),
            UID,
            &w,
            now
        )));
        // A key that does not match the certificate.
        let (_, other_tls) = issued(&w, now);
        let mut mixed = tls.clone();
        mixed.data.as_mut().unwrap().insert(
            "tls.key".into(),
            other_tls.data.as_ref().unwrap()["tls.key"].clone(),
        );
        assert!(issue(false)(&plan(Some(&ca), Some(&mixed), UID, &w, now)));
    }

    #[test]
    fn a_secret_of_someone_else_is_left_alone() {
        let w = wanted(&["cache-portal.shop.svc"]);
        let now = SystemTime::now();
        let (ca, mut tls) = issued(&w, now);
        tls.metadata.annotations = None;
        let plan = plan(Some(&ca), Some(&tls), UID, &w, now);
        assert!(
            matches!(&plan, Plan::Foreign(m) if m.contains("cache-portal-tls") && m.contains("tls.secretName")),
            "{plan:?}"
        );
    }
}
