//! How tpserve reaches a secured etcd: TLS (`https://` endpoints, the CA that signed etcd's
//! server certificate, and a client certificate for an etcd started with `--client-cert-auth`)
//! and etcd's own authentication (a user and password, exchanged for a token that goes with every
//! request; etcd's role permissions then confine the user to its key prefix).
//!
//! Both binaries read the same variables, so one Kubernetes Secret configures a whole pod; they
//! mirror etcdctl's `ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`, `ETCDCTL_USER` and
//! `ETCDCTL_PASSWORD`. Reading them here rather than through flags keeps the password out of
//! process listings and lets every caller of [`crate::EtcdClient::new`] honour them.
//! Files are read once, when the client is built.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The CA bundle (PEM) that signed the etcd servers' certificates; needed for `https://`.
pub const ENV_CACERT: &str = "TPSERVE_ETCD_CACERT";
/// This client's certificate (PEM), for an etcd that asks for one (`--client-cert-auth`).
pub const ENV_CERT: &str = "TPSERVE_ETCD_CERT";
/// The private key (PEM) of [`ENV_CERT`].
pub const ENV_KEY: &str = "TPSERVE_ETCD_KEY";
/// The etcd user to authenticate as (etcd's `auth enable`).
pub const ENV_USER: &str = "TPSERVE_ETCD_USER";
/// That user's password.
pub const ENV_PASSWORD: &str = "TPSERVE_ETCD_PASSWORD";

/// TLS files and credentials for etcd; all optional. See the module docs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// PEM bundle of the CA(s) to trust for `https://` endpoints (and only those: no system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, sent when the server asks for one.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// etcd user name, authenticated with `password` for a token.
    pub user: Option<String>,
    /// The user's password.
    pub password: Option<String>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl EtcdSecurity {
    /// The settings from `TPSERVE_ETCD_*` (an empty variable counts as unset).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The settings from `lookup(variable name)`; [`EtcdSecurity::from_env`] without the process
    /// environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Self {
            ca_file: get(ENV_CACERT).map(PathBuf::from),
            cert_file: get(ENV_CERT).map(PathBuf::from),
            key_file: get(ENV_KEY).map(PathBuf::from),
            user: get(ENV_USER),
            password: get(ENV_PASSWORD),
        }
    }

    /// Checks that the settings go together with each other and with `endpoints` (normalized
    /// URLs): a certificate needs its key, a password its user, `https://` a CA, and TLS files
    /// are refused when no endpoint uses TLS (a sign of a misconfiguration that would otherwise
    /// send credentials in the clear).
    pub fn validate(&self, endpoints: &[String]) -> Result<()> {
        let bad = |detail: String| Err(Error::Security { detail });
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad(format!(
                "{ENV_CERT} and {ENV_KEY} go together: set both or neither"
            ));
        }
        if self.password.is_some() && self.user.is_none() {
            return bad(format!("{ENV_PASSWORD} is set without {ENV_USER}"));
        }
        if self.user.is_some() && self.password.is_none() && self.cert_file.is_none() {
            return bad(format!(
                "{ENV_USER} needs {ENV_PASSWORD} (or a client certificate whose common name is the user)"
            ));
        }
        let tls = endpoints.iter().any(|e| e.starts_with("https://"));
        if tls && self.ca_file.is_none() {
            return bad(format!(
                "https:// etcd endpoints need {ENV_CACERT}, the CA that signed etcd's certificate"
            ));
        }
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return bad(format!(
                "{ENV_CACERT} or {ENV_CERT} is set but no etcd endpoint is https://"
            ));
        }
        Ok(())
    }

    /// Whether requests authenticate with a user and password (a token per request).
    pub(crate) fn password_auth(&self) -> Option<(&str, &str)> {
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => Some((user, password)),
            _ => None,
        }
    }

    /// Adds the CA and the client identity to `builder` (rustls, trusting only the CA).
    pub(crate) fn configure(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder> {
        let Some(ca_file) = &self.ca_file else {
            return Ok(builder);
        };
        builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
        let ca = read(ca_file)?;
        let roots = reqwest::Certificate::from_pem_bundle(&ca).map_err(|e| Error::Security {
            detail: format!("{ENV_CACERT}={}: {e}", ca_file.display()),
        })?;
        if roots.is_empty() {
            return Err(Error::Security {
                detail: format!("{ENV_CACERT}={} holds no certificate", ca_file.display()),
            });
        }
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
        if let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) {
            let mut pem = read(cert_file)?;
            pem.push(b'\n');
            pem.extend(read(key_file)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| Error::Security {
                detail: format!(
                    "{ENV_CERT}={} with {ENV_KEY}={}: {e}",
                    cert_file.display(),
                    key_file.display()
                ),
            })?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Security {
        detail: format!("reading {}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> EtcdSecurity {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EtcdSecurity::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn variables_fill_the_settings_and_empty_ones_count_as_unset() {
        let s = from(&[
            (ENV_CACERT, "/tls/ca.crt"),
            (ENV_CERT, "/tls/tls.crt"),
            (ENV_KEY, "/tls/tls.key"),
            (ENV_USER, ""),
        ]);
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/tls/ca.crt")));
        assert_eq!(s.key_file.as_deref(), Some(Path::new("/tls/tls.key")));
        assert_eq!(s.user, None);
        assert_eq!(from(&[]), EtcdSecurity::default());
    }

    #[test]
    fn settings_that_do_not_go_together_are_refused() {
        let https = ["https://etcd:2379".to_string()];
        let http = ["http://etcd:2379".to_string()];
        let refused = |s: EtcdSecurity, endpoints: &[String]| {
            matches!(s.validate(endpoints), Err(Error::Security { .. }))
        };
        assert!(refused(from(&[(ENV_CERT, "c")]), &https));
        assert!(refused(from(&[(ENV_PASSWORD, "p")]), &http));
        assert!(refused(from(&[(ENV_USER, "u")]), &http));
        assert!(refused(from(&[]), &https), "https needs a CA");
        assert!(refused(from(&[(ENV_CACERT, "ca")]), &http));
        assert!(from(&[(ENV_USER, "u"), (ENV_PASSWORD, "p")])
            .validate(&http)
            .is_ok());
        assert!(from(&[(ENV_CACERT, "ca"), (ENV_CERT, "c"), (ENV_KEY, "k")])
            .validate(&https)
            .is_ok());
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let s = from(&[(ENV_USER, "rel"), (ENV_PASSWORD, "hunter2")]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("rel"));
    }
}
