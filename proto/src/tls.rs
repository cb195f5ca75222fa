//! Mutual TLS between the coordinator and its workers: `--worker-tls-cert`, `--worker-tls-key` and
//! `--worker-tls-ca`, the same three flags on both sides. A worker given them serves gRPC over
//! TLS with its certificate and accepts only callers that present a client certificate signed by
//! the CA; a coordinator given them presents its certificate and accepts only workers whose
//! certificate the CA signed for the address it dials (an IP address SAN such as `127.0.0.1`, or
//! a DNS name). rustls with ring does the work (tonic's `tls-ring`).
//!
//! The files are read once, at start; PEM only. The group token (`--worker-token`) still applies
//! on top: TLS proves who is at each end of the connection, the token which group it belongs to.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The environment variable of `--worker-tls-cert` (also how a coordinator hands its files to
/// the workers it spawns).
pub const WORKER_TLS_CERT_ENV: &str = "TPSERVE_WORKER_TLS_CERT";
/// The environment variable of `--worker-tls-key`.
pub const WORKER_TLS_KEY_ENV: &str = "TPSERVE_WORKER_TLS_KEY";
/// The environment variable of `--worker-tls-ca`.
pub const WORKER_TLS_CA_ENV: &str = "TPSERVE_WORKER_TLS_CA";

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of the three flags were given, not all.
    #[error(
        "--worker-tls-cert, --worker-tls-key and --worker-tls-ca go together; missing: {missing}"
    )]
    Incomplete { missing: String },
    /// A file could not be read.
    #[error("--{flag} {path}: {detail}")]
    Read {
        flag: &'static str,
        path: String,
        detail: String,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("--{flag} {path}: no PEM {what} in it")]
    NotPem {
        flag: &'static str,
        path: String,
        what: &'static str,
    },
}

/// A certificate, its private key and the CA that signs the other side's certificates.
#[derive(Clone)]
pub struct WorkerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    paths: [PathBuf; 3],
}

impl std::fmt::Debug for WorkerTls {
    /// Names the files, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTls")
            .field("cert", &self.paths[0])
            .field("ca", &self.paths[2])
            .finish_non_exhaustive()
    }
}

/// Reads `path` (the file of `--flag`) and checks it holds a PEM block whose label ends with
/// `label`.
fn read_pem(flag: &'static str, path: &Path, label: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read {
        flag,
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|name| name.ends_with(label))
    });
    if !found {
        return Err(TlsError::NotPem {
            flag,
            path: path.display().to_string(),
            what: label,
        });
    }
    Ok(bytes)
}

impl WorkerTls {
    /// The files of the three flags: `None` when none is given, an error when only some are.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let (cert, key, ca) = match (cert, key, ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            _ => {
                let missing: Vec<&str> = [
                    ("--worker-tls-cert", cert),
                    ("--worker-tls-key", key),
                    ("--worker-tls-ca", ca),
                ]
                .into_iter()
                .filter(|(_, p)| p.is_none())
                .map(|(flag, _)| flag)
                .collect();
                return Err(TlsError::Incomplete {
                    missing: missing.join(", "),
                });
            }
        };
        Ok(Some(Self {
            cert: read_pem("worker-tls-cert", cert, "CERTIFICATE")?,
            key: read_pem("worker-tls-key", key, "PRIVATE KEY")?,
            ca: read_pem("worker-tls-ca", ca, "CERTIFICATE")?,
            paths: [cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()],
        }))
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// A worker's side: serve with this certificate, require clients signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// The coordinator's side: present this certificate, trust only workers signed by the CA.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity())
            .ca_certificate(Certificate::from_pem(&self.ca))
    }

    /// The environment that gives a spawned worker the same files.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            (WORKER_TLS_CERT_ENV, self.paths[0].as_path()),
            (WORKER_TLS_KEY_ENV, self.paths[1].as_path()),
            (WORKER_TLS_CA_ENV, self.paths[2].as_path()),
        ]
    }
}
