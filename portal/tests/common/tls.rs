//! Test certificates: a throwaway CA and the server and client certificates it signs,
//! generated with rcgen, written to temp files for the portal and the real clients.
//!
//! Used by the integration tests (as `common::tls`) and the unit tests of `portal::tls`
//! (by path); depends only on rcgen, std and `harness.rs`, which it loads for [`TempDir`].
#![allow(dead_code)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's common name, to tell rotations apart.
    pub name: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP literals), valid for a day.
    pub fn server(&self, cn: &str, names: &[&str]) -> Leaf {
        self.leaf(cn, names, ExtendedKeyUsagePurpose::ServerAuth, 1)
    }

    /// A server certificate valid for `days` days from now.
    pub fn server_for_days(&self, cn: &str, names: &[&str], days: i64) -> Leaf {
        self.leaf(cn, names, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// A client certificate.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, 1)
    }

    fn leaf(&self, cn: &str, names: &[&str], eku: ExtendedKeyUsagePurpose, days: i64) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![eku];
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
        params.not_before = now - std::time::Duration::from_secs(3600);
        params.not_after = if days >= 0 {
            now + std::time::Duration::from_secs(days as u64 * 86_400)
        } else {
            now - std::time::Duration::from_secs(days.unsigned_abs() * 86_400)
        };
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            name: cn.to_string(),
        }
    }
}

impl Leaf {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// Replaces the files atomically (write aside, rename over), as a careful tool does.
    pub fn replace(&self, cert: &Path, key: &Path) {
        let cert_tmp = cert.with_extension("crt.new");
        let key_tmp = key.with_extension("key.new");
        std::fs::write(&cert_tmp, &self.cert_pem).unwrap();
        std::fs::write(&key_tmp, &self.key_pem).unwrap();
        std::fs::rename(&key_tmp, key).unwrap();
        std::fs::rename(&cert_tmp, cert).unwrap();
    }
}

// The library's unit tests include this file alone and want its temporary directory; the
// integration tests reach the harness through here too (`common::harness`), so that the file
// is loaded once.
#[path = "harness.rs"]
pub mod harness;
pub use harness::TempDir;
