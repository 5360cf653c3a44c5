//! The cluster's certificate authority and what it issues. The operator holds the CA (in a
//! Secret of its own namespace) and issues two kinds of certificate from it:
//!
//! - its own client certificate, named [`OPERATOR_NAME`]: the only name a sidecar obeys;
//! - one server certificate per VM namespace, named [`sidecar_name`]`(namespace)`, which every
//!   VM pod of that namespace mounts. The operator checks that name when it dials a sidecar, so
//!   a pod cannot pose as the sidecar of another namespace.
//!
//! The names live under `faultline.internal`, which no public CA issues and no DNS resolves:
//! they are identities, not addresses (sidecars are dialled by pod IP).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// The name in the operator's client certificate.
pub const OPERATOR_NAME: &str = "operator.faultline.internal";

/// The CA's common name.
const CA_NAME: &str = "Faultline cluster CA";

/// How far back a new certificate's validity starts, for clocks that lag the issuer's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The name in the server certificate of the sidecars of `namespace`.
pub fn sidecar_name(namespace: &str) -> String {
    format!("sidecar.{namespace}.faultline.internal")
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client (the operator dialling sidecars).
    Client,
    /// A TLS server (a sidecar's control API).
    Server,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate authority: its certificate and key, PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA, valid for `validity` from now.
    pub fn generate(validity: Duration) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA from its PEM certificate and key (as stored in the operator's Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        KeyPair::from_pem(key_pem)?;
        certs_from_pem("CA certificate", cert_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// The CA key, PEM (for the Secret that stores it; nothing else needs it).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate for `dns_name`, valid for `validity` from now.
    pub fn issue(
        &self,
        dns_name: &str,
        usage: Usage,
        validity: Duration,
    ) -> Result<Issued, TlsError> {
        self.issue_for(&[dns_name.to_string()], None, usage, validity)
    }

    /// A server certificate for several names and an address (sidecars on one machine, which
    /// pose as the sidecars of several namespaces and are dialled by address).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ip: Option<std::net::IpAddr>,
        validity: Duration,
    ) -> Result<Issued, TlsError> {
        self.issue_for(dns_names, ip, Usage::Server, validity)
    }

    fn issue_for(
        &self,
        dns_names: &[String],
        ip: Option<std::net::IpAddr>,
        usage: Usage,
        validity: Duration,
    ) -> Result<Issued, TlsError> {
        let dns_name = dns_names
            .first()
            .ok_or_else(|| TlsError::Invalid("a certificate needs a name".into()))?;
        // The issuer is named by its subject and key, which is all a signature needs: the
        // subject is the same for every Faultline CA, the key is this one's.
        let issuer = Issuer::new(ca_params(), KeyPair::from_pem(&self.key_pem)?);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ip.map(rcgen::SanType::IpAddress));
        params.distinguished_name = name(dns_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let not_after = set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// What every Faultline CA certificate says of itself.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Faultline");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> SystemTime {
    let now = SystemTime::now();
    let not_after = now + validity;
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = not_after.into();
    not_after
}

/// Every certificate in a PEM bundle.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

/// A trust store holding the CA certificates in `ca_pem`.
pub fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_from_pem("CA certificate", ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_their_ca_only() {
        let ca = Ca::generate(Duration::from_secs(3600)).unwrap();
        let other = Ca::generate(Duration::from_secs(3600)).unwrap();
        let leaf = ca
            .issue(OPERATOR_NAME, Usage::Client, Duration::from_secs(60))
            .unwrap();
        let cert = &certs_from_pem("leaf", &leaf.cert_pem).unwrap()[0];
        let ee = webpki::EndEntityCert::try_from(cert).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let algs = super::super::provider().signature_verification_algorithms;
        let verify = |ca: &Ca| {
            let anchors: Vec<_> = certs_from_pem("ca", &ca.cert_pem)
                .unwrap()
                .iter()
                .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
                .collect();
            ee.verify_for_usage(
                algs.all,
                &anchors,
                &[],
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
        };
        verify(&ca).unwrap();
        assert!(verify(&other).is_err());
        let reloaded = Ca::from_pem(&ca.cert_pem, ca.key_pem()).unwrap();
        assert_eq!(reloaded.cert_pem, ca.cert_pem);
        assert!(Ca::from_pem("junk", ca.key_pem()).is_err());
        assert!(key_from_pem("key", &leaf.key_pem).is_ok());
        assert!(certs_from_pem("nothing", "").is_err());
    }
}
