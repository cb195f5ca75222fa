//! The client against a secured real etcd: TLS with client certificates (`--client-cert-auth`,
//! what the Helm chart's bundled etcd runs), and etcd's user authentication with a role that
//! confines a release's user to its own key prefix (what an external etcd shared by several
//! releases needs). The certificates are made by the `openssl` command in a temporary directory;
//! the client key is PKCS#1 RSA, the format Helm's `genSignedCert` writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use support::{etcd_binary, free_port};
use tpserve_cluster::{Error, EtcdClient, EtcdSecurity, GroupWatcher, Registration};

mod support;

const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

/// One etcd member on loopback with `args` added; killed on drop.
struct Etcd {
    _dir: tempfile::TempDir,
    client_url: String,
    child: Child,
    log: PathBuf,
}

impl Etcd {
    fn start(dir: tempfile::TempDir, scheme: &str, args: &[String]) -> anyhow::Result<Self> {
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = dir.path().join("etcd.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(etcd_binary()?)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self {
            _dir: dir,
            client_url,
            child,
            log,
        })
    }

    /// Waits until `client` can read from etcd.
    async fn wait_ready(&mut self, client: &EtcdClient) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            match client.get_prefix("/").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "etcd did not answer within {WAIT:?}: {e}; log: {}",
                        self.log_tail()
                    )
                }
                Err(_) => {}
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("etcd exited ({status}): {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log[log.len().saturating_sub(2000)..].to_string()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (Debian: apt-get install openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate whose common name is
/// `client_cn`, in `dir`: ca.crt, server.crt/.key, client.crt/.key, and other.crt/.key from a
/// second CA that etcd does not trust.
fn make_certificates(dir: &Path, client_cn: &str) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (subject, key, crt) = (
            format!("/CN=tpserve test {ca}"),
            format!("{ca}.key"),
            format!("{ca}.crt"),
        );
        let mut args = vec!["req", "-x509", "-days", "1", "-subj", &subject];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt]);
        openssl(dir, &args)?;
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    let mut server = vec![
        "req",
        "-subj",
        "/CN=etcd",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    server.extend(ec);
    openssl(dir, &server)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    )?;
    for (name, ca) in [("client", "ca"), ("other", "other-ca")] {
        // PKCS#1 RSA, as Helm's genSignedCert writes it.
        openssl(
            dir,
            &[
                "genrsa",
                "-traditional",
                "-out",
                &format!("{name}.key"),
                "2048",
            ],
        )?;
        let subject = format!("/CN={client_cn}");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &subject,
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "client.ext",
                "-out",
                &format!("{name}.crt"),
            ],
        )?;
    }
    Ok(())
}

fn tls(dir: &Path, client: Option<&str>) -> EtcdSecurity {
    EtcdSecurity {
        ca_file: Some(dir.join("ca.crt")),
        cert_file: client.map(|c| dir.join(format!("{c}.crt"))),
        key_file: client.map(|c| dir.join(format!("{c}.key"))),
        ..EtcdSecurity::default()
    }
}

fn user(name: &str, password: &str) -> EtcdSecurity {
    EtcdSecurity {
        user: Some(name.into()),
        password: Some(password.into()),
        ..EtcdSecurity::default()
    }
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    String::from_utf8(end).unwrap()
}

/// One call of etcd's auth API through its gateway, as an administrator would make it with
/// etcdctl (`user add`, `role grant-permission --prefix`, `auth enable`, ...).
async fn admin(
    http: &reqwest::Client,
    etcd: &Etcd,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> anyhow::Result<Value> {
    let mut post = http.post(format!("{}/v3/auth/{path}", etcd.client_url));
    if let Some(token) = token {
        post = post.header("authorization", token);
    }
    let resp = post.json(&body).send().await?;
    let status = resp.status();
    let answer: Value = resp.json().await?;
    ensure!(status.is_success(), "auth/{path}: {status} {answer}");
    Ok(answer)
}

/// Creates `root` and a user per release confined to `/tpserve/<namespace>.<release>-` (the
/// prefix of every cluster name the chart gives that release's pods), then enables auth.
async fn set_up_release_users(etcd: &Etcd, releases: &[(&str, &str)]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    admin(
        &http,
        etcd,
        "user/add",
        None,
        json!({"name": "root", "password": "rootpw"}),
    )
    .await?;
    admin(&http, etcd, "role/add", None, json!({"name": "root"})).await?;
    admin(
        &http,
        etcd,
        "user/grant",
        None,
        json!({"user": "root", "role": "root"}),
    )
    .await?;
    for (name, password) in releases {
        let prefix = format!("/tpserve/ns.{name}-");
        admin(&http, etcd, "role/add", None, json!({"name": name})).await?;
        let perm = json!({"permType": "READWRITE", "key": B64.encode(&prefix),
                          "range_end": B64.encode(prefix_end(&prefix))});
        admin(
            &http,
            etcd,
            "role/grant",
            None,
            json!({"name": name, "perm": perm}),
        )
        .await?;
        admin(
            &http,
            etcd,
            "user/add",
            None,
            json!({"name": name, "password": password}),
        )
        .await?;
        admin(
            &http,
            etcd,
            "user/grant",
            None,
            json!({"user": name, "role": name}),
        )
        .await?;
    }
    admin(&http, etcd, "enable", None, json!({})).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_with_its_certificate_registers_and_watches_and_others_are_turned_away(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    make_certificates(dir.path(), "tpserve")?;
    let d = dir.path();
    let args: Vec<String> = [
        ("cert-file", "server.crt"),
        ("key-file", "server.key"),
        ("trusted-ca-file", "ca.crt"),
    ]
    .iter()
    .map(|(flag, file)| format!("--{flag}={}", d.join(file).display()))
    .chain(["--client-cert-auth".to_string()])
    .collect();
    let certs = d.to_path_buf();
    let mut etcd = Etcd::start(dir, "https", &args)?;
    let endpoints = [etcd.client_url.clone()];
    let client = EtcdClient::with_security(&endpoints, &tls(&certs, Some("client")))?;
    etcd.wait_ready(&client).await?;

    let mut watcher = GroupWatcher::new(client.clone(), "ns.rel-0", "default", 1);
    let key = GroupWatcher::key("ns.rel-0", "default", 0);
    let registration = Registration::start(client.clone(), key, "127.0.0.1:50051", TTL).await?;
    let formed = tokio::time::timeout(WAIT, watcher.wait_for(|m| m.complete)).await??;
    assert_eq!(formed.members[&0], "127.0.0.1:50051");
    registration.stop().await?;

    // No client certificate, one from a CA etcd does not trust, or plain HTTP: no way in.
    let refused = |security: EtcdSecurity| {
        let endpoints = endpoints.clone();
        async move {
            let client = EtcdClient::with_security(&endpoints, &security).unwrap();
            client
                .put("/tpserve/ns.rel-0/default/workers/0", "10.6.6.6:1", None)
                .await
        }
    };
    for (what, security) in [
        ("no client certificate", tls(&certs, None)),
        ("a certificate of another CA", tls(&certs, Some("other"))),
    ] {
        match refused(security).await {
            Err(Error::Connect { .. }) => {}
            other => bail!("{what}: expected a refused connection, got {other:?}"),
        }
    }
    let plain = endpoints[0].replace("https://", "http://");
    let client = EtcdClient::with_security(&[plain], &EtcdSecurity::default())?;
    ensure!(
        client.get_prefix("/").await.is_err(),
        "plain HTTP to a TLS port must fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_user_registers_under_its_own_prefix_and_is_refused_under_another(
) -> anyhow::Result<()> {
    let mut etcd = Etcd::start(tempfile::tempdir()?, "http", &[])?;
    let endpoints = [etcd.client_url.clone()];
    etcd.wait_ready(&EtcdClient::with_security(
        &endpoints,
        &EtcdSecurity::default(),
    )?)
    .await?;
    set_up_release_users(&etcd, &[("rel-a", "pw-a"), ("rel-b", "pw-b")]).await?;

    let a = EtcdClient::with_security(&endpoints, &user("rel-a", "pw-a"))?;
    let mut watcher = GroupWatcher::new(a.clone(), "ns.rel-a-0", "default", 2);
    let mut registrations = Vec::new();
    for rank in 0..2 {
        let key = GroupWatcher::key("ns.rel-a-0", "default", rank);
        let addr = format!("127.0.0.1:{}", 50051 + rank);
        registrations.push(Registration::start(a.clone(), key, addr, TTL).await?);
    }
    let formed = tokio::time::timeout(WAIT, watcher.wait_for(|m| m.complete)).await??;
    assert_eq!(formed.members[&1], "127.0.0.1:50052");

    // Release b's user cannot plant an address in release a's group, nor read it.
    let b = EtcdClient::with_security(&endpoints, &user("rel-b", "pw-b"))?;
    b.put("/tpserve/ns.rel-b-0/default/workers/0", "127.0.0.1:1", None)
        .await?;
    let forged = b
        .put("/tpserve/ns.rel-a-0/default/workers/1", "10.6.6.6:1", None)
        .await;
    match forged {
        Err(Error::Rpc {
            code: 7, message, ..
        }) => assert!(message.contains("permission denied")),
        other => bail!("expected permission denied, got {other:?}"),
    }
    ensure!(b.get_prefix("/tpserve/ns.rel-a-0/").await.is_err());
    ensure!(b.watch_prefix("/tpserve/ns.rel-a-0/", 0).await.is_err());

    // Without credentials, or with the wrong password: refused.
    let anonymous = EtcdClient::with_security(&endpoints, &EtcdSecurity::default())?;
    ensure!(anonymous
        .put("/tpserve/ns.rel-a-0/default/workers/1", "10.6.6.6:1", None)
        .await
        .is_err());
    let wrong = EtcdClient::with_security(&endpoints, &user("rel-a", "guess"))?;
    match wrong.get_prefix("/tpserve/ns.rel-a-0/").await {
        Err(Error::Rpc { message, .. }) => assert!(message.contains("authentication failed")),
        other => bail!("expected an authentication failure, got {other:?}"),
    }
    let still = watcher.current();
    assert_eq!(
        still.members[&1], "127.0.0.1:50052",
        "the group is untouched"
    );
    for r in registrations {
        r.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_replaced_without_the_caller_noticing() -> anyhow::Result<()> {
    // Tokens unused for a second expire.
    let args = ["--auth-token-ttl=1".to_string()];
    let mut etcd = Etcd::start(tempfile::tempdir()?, "http", &args)?;
    let endpoints = [etcd.client_url.clone()];
    etcd.wait_ready(&EtcdClient::with_security(
        &endpoints,
        &EtcdSecurity::default(),
    )?)
    .await?;
    set_up_release_users(&etcd, &[("rel-a", "pw-a")]).await?;
    let a = EtcdClient::with_security(&endpoints, &user("rel-a", "pw-a"))?;
    let key = "/tpserve/ns.rel-a-0/default/workers/0";
    a.put(key, "127.0.0.1:1", None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.put(key, "127.0.0.1:2", None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (kvs, revision) = a.get_prefix("/tpserve/ns.rel-a-0/").await?;
    assert_eq!(kvs, [(key.to_string(), "127.0.0.1:2".to_string())]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A watch made with an expired token (etcd says "permission denied") is made again.
    let mut events = a.watch_prefix("/tpserve/ns.rel-a-0/", revision).await?;
    let first = tokio::time::timeout(WAIT, events.next())
        .await?
        .context("watch ended")??;
    assert_eq!(first.key(), key);
    Ok(())
}
