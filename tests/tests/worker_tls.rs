//! Mutual TLS between the coordinator and its workers (`--worker-tls-*`), with a CA and
//! certificates made here (rcgen): a real `tpserve-worker` with TLS refuses a plain-text caller,
//! a caller without a client certificate and one whose certificate another CA signed, and a
//! caller that does not trust the worker's CA gets nowhere either; a caller with the right
//! certificate is answered; and a real `tpserve serve` whose spawned workers use the same files
//! gives a real completion, so the coordinator's side works too.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::json;
use tokio::process::Command;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tpserve_e2e::{binary, default_model, post_json, spawn_worker, Server};
use tpserve_proto::worker_client::WorkerClient;
use tpserve_proto::InfoRequest;

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for 127.0.0.1 and localhost, good for both ends of a connection, signed by
/// `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The three files of `--worker-tls-*` in `dir`, named after `name`: (cert, key, ca).
fn write_files(dir: &Path, name: &str, ca: &Ca) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = leaf(ca, name);
    let paths = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}-ca.crt")),
    );
    std::fs::write(&paths.0, cert).unwrap();
    std::fs::write(&paths.1, key).unwrap();
    std::fs::write(&paths.2, &ca.pem).unwrap();
    paths
}

/// Calls the worker's `Info` at `addr` over `tls` (none: plain text).
async fn info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("{e:?}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    WorkerClient::new(channel)
        .info(InfoRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn a_worker_with_tls_answers_only_callers_its_ca_signed_and_serves_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let group_ca = ca("tpserve group CA");
    let other_ca = ca("another CA");
    let (cert, key, ca_file) = write_files(dir.path(), "worker", &group_ca);
    let (client_cert, client_key) = leaf(&group_ca, "coordinator");
    let (stranger_cert, stranger_key) = leaf(&other_ca, "stranger");

    let tls_flags: [&OsStr; 6] = [
        "--worker-tls-cert".as_ref(),
        cert.as_os_str(),
        "--worker-tls-key".as_ref(),
        key.as_os_str(),
        "--worker-tls-ca".as_ref(),
        ca_file.as_os_str(),
    ];
    let (mut child, addr) = spawn_worker(&tls_flags, &[]).await;
    let trusts_group =
        || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&group_ca.pem));

    let refused = [
        ("plain text", None),
        ("no client certificate", Some(trusts_group())),
        (
            "a client certificate from another CA",
            Some(trusts_group().identity(Identity::from_pem(&stranger_cert, &stranger_key))),
        ),
        (
            "a caller that does not trust the worker's CA",
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&other_ca.pem))
                    .identity(Identity::from_pem(&stranger_cert, &stranger_key)),
            ),
        ),
    ];
    for (what, tls) in refused {
        let result = info(&addr, tls).await;
        assert!(result.is_err(), "{what} was answered");
        eprintln!("{what}: refused: {}", result.unwrap_err());
    }
    let right = trusts_group().identity(Identity::from_pem(&client_cert, &client_key));
    info(&addr, Some(right))
        .await
        .expect("a caller with a certificate from the group's CA is answered");
    child.kill().await.unwrap();

    // The coordinator's side: spawned workers serve with the same files, the coordinator
    // presents them, and a completion goes through.
    let s = Server::smollm2(&[
        "--max-model-len",
        "256",
        "-t",
        "3",
        "--worker-tls-cert",
        cert.to_str().unwrap(),
        "--worker-tls-key",
        key.to_str().unwrap(),
        "--worker-tls-ca",
        ca_file.to_str().unwrap(),
    ])
    .await;
    let http = reqwest::Client::new();
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0});
    let answer = post_json(&http, s.url("/v1/chat/completions"), &body).await;
    assert_eq!(
        answer["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{answer}"
    );
    s.stop().await;
}

#[tokio::test]
async fn incomplete_or_unreadable_tls_flags_stop_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let group_ca = ca("tpserve group CA");
    let (cert, key, _) = write_files(dir.path(), "worker", &group_ca);
    let model = default_model();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--worker-tls-cert", cert.to_str().unwrap()],
            "missing: --worker-tls-key, --worker-tls-ca",
        ),
        (
            &[
                "--worker-tls-cert",
                cert.to_str().unwrap(),
                "--worker-tls-key",
                cert.to_str().unwrap(),
                "--worker-tls-ca",
                cert.to_str().unwrap(),
            ],
            "no PEM PRIVATE KEY",
        ),
        (
            &[
                "--worker-tls-cert",
                cert.to_str().unwrap(),
                "--worker-tls-key",
                key.to_str().unwrap(),
                "--worker-tls-ca",
                "/nonexistent/ca.crt",
            ],
            "--worker-tls-ca /nonexistent/ca.crt",
        ),
    ];
    for (flags, expected) in cases {
        let out = Command::new(binary("tpserve"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(flags)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{flags:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        // The worker refuses the same flags the same way.
        let out = Command::new(binary("tpserve-worker"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--device",
                "cpu",
                "--progress",
                "off",
            ])
            .args(flags)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "worker with {flags:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "worker with {flags:?}: {stderr}");
    }
}
