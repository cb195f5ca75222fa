//! Tests against a real etcd process. Each test starts its own etcd on free loopback ports with a
//! temporary data dir and kills it at the end. The binary comes from `TPSERVE_ETCD_BIN`, else
//! `etcd` on PATH, else the cache dir that `scripts/install-etcd.sh` fills; without one the tests
//! fail (run that script).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use support::{etcd_binary, free_port};
use tpserve_cluster::{
    Error, EtcdClient, GroupWatcher, Membership, Registration, WatchEvent, WatchStream,
};

mod support;

const TTL: Duration = Duration::from_secs(2);
/// etcd checks lease expiry every 500 ms; allow that plus scheduling noise.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tpserve_cluster=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One etcd member on loopback; killed on drop.
struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    async fn start() -> anyhow::Result<Self> {
        let mut etcd = Etcd {
            bin: etcd_binary()?,
            dir: tempfile::tempdir()?,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.spawn().await?;
        Ok(etcd)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn client(&self) -> EtcdClient {
        EtcdClient::new(&[self.endpoint()]).unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.bin)
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        let deadline = Instant::now() + WAIT;
        loop {
            if client.get_prefix("/").await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("etcd exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer within {WAIT:?}: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        log[log.len().saturating_sub(2000)..].to_string()
    }

    /// SIGKILL, like a crash: the data dir survives.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd, keeps it down for `down`, and starts it again on the same ports and data dir.
    async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.kill();
        tokio::time::sleep(down).await;
        self.spawn().await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` until it holds or `limit` passes; returns how long it took.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn value_of(client: &EtcdClient, key: &str) -> Option<String> {
    let (kvs, _) = client.get_prefix(key).await.expect("range");
    kvs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

async fn wait_membership(
    watcher: &mut GroupWatcher,
    what: &str,
    pred: impl FnMut(&Membership) -> bool,
) -> anyhow::Result<Membership> {
    tokio::time::timeout(WAIT, watcher.wait_for(pred))
        .await
        .with_context(|| format!("waiting for {what}"))?
        .map_err(Into::into)
}

async fn next_event(events: &mut WatchStream) -> anyhow::Result<WatchEvent> {
    let item = tokio::time::timeout(WAIT, events.next())
        .await
        .context("waiting for a watch event")?;
    Ok(item.context("watch stream ended")??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_puts_lists_deletes_and_watches_from_a_revision() -> anyhow::Result<()> {
    init_logs();
    let etcd = Etcd::start().await?;
    let client = etcd.client();
    client.put("/t/b", "2", None).await?;
    client.put("/t/a", "1", None).await?;
    client.put("/u/a", "outside", None).await?;
    let (kvs, revision) = client.get_prefix("/t/").await?;
    assert_eq!(
        kvs,
        [("/t/a".into(), "1".into()), ("/t/b".into(), "2".into())]
    );

    let mut events = client.watch_prefix("/t/", revision + 1).await?;
    client.put("/u/b", "outside", None).await?;
    let put_rev = client.put("/t/c", "3", None).await?;
    assert_eq!(client.delete("/t/a").await?, 1);
    assert_eq!(client.delete("/t/a").await?, 0);
    assert_eq!(
        next_event(&mut events).await?,
        WatchEvent::Put {
            key: "/t/c".into(),
            value: "3".into(),
            revision: put_rev
        }
    );
    assert!(
        matches!(next_event(&mut events).await?, WatchEvent::Delete { key, .. } if key == "/t/a")
    );

    // A watch from an old revision replays history.
    let mut replay = client.watch_prefix("/t/", revision + 1).await?;
    assert_eq!(next_event(&mut replay).await?.key(), "/t/c");

    // Lease calls on a lease that is gone say so.
    let lease = client.grant_lease(5).await?;
    assert!(client.keep_alive(lease).await? > 0);
    client.revoke(lease).await?;
    assert!(matches!(
        client.keep_alive(lease).await,
        Err(Error::LeaseExpired { .. })
    ));
    assert!(matches!(
        client.revoke(lease).await,
        Err(Error::LeaseExpired { .. })
    ));
    assert!(matches!(
        client.put("/t/d", "x", Some(lease)).await,
        Err(Error::LeaseExpired { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_skips_an_unreachable_endpoint_and_reports_when_none_answers() -> anyhow::Result<()>
{
    init_logs();
    let etcd = Etcd::start().await?;
    let dead = format!("127.0.0.1:{}", free_port());
    let client = EtcdClient::new(&[dead.clone(), etcd.endpoint()])?;
    client.put("/k", "v", None).await?;
    assert_eq!(value_of(&client, "/k").await.as_deref(), Some("v"));
    let mut events = client.watch_prefix("/k", 0).await?;
    client.put("/k", "w", None).await?;
    assert!(
        matches!(next_event(&mut events).await?, WatchEvent::Put { value, .. } if value == "w")
    );

    let nobody = EtcdClient::new(&[dead])?;
    match nobody.get_prefix("/").await {
        Err(Error::Connect { .. }) => Ok(()),
        other => bail!("expected a Connect error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_key_stays_while_refreshed_and_vanishes_within_ttl_after_its_worker_dies(
) -> anyhow::Result<()> {
    init_logs();
    let etcd = Etcd::start().await?;
    let client = etcd.client();
    let key = GroupWatcher::key("c", "g", 0);
    let reg = Registration::start(client.clone(), key.clone(), "10.0.0.1:50051", TTL).await?;
    assert_eq!(
        value_of(&client, &key).await.as_deref(),
        Some("10.0.0.1:50051")
    );
    // Outlive the TTL: only the keepalive task keeps the key.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(
        value_of(&client, &key).await.as_deref(),
        Some("10.0.0.1:50051")
    );

    drop(reg); // a killed worker: no revoke
    let took = eventually(
        TTL + EXPIRY_MARGIN,
        "key gone after the worker died",
        || async { value_of(&client, &key).await.is_none() },
    )
    .await?;
    eprintln!("key vanished {took:?} after the registration stopped (ttl {TTL:?})");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_registration_revokes_its_key_at_once() -> anyhow::Result<()> {
    init_logs();
    let etcd = Etcd::start().await?;
    let client = etcd.client();
    let key = GroupWatcher::key("c", "g", 1);
    let reg =
        Registration::start(client.clone(), key.clone(), "a:1", Duration::from_secs(30)).await?;
    assert!(value_of(&client, &key).await.is_some());
    reg.stop().await?;
    assert_eq!(value_of(&client, &key).await, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_whose_lease_was_revoked_behind_its_back_registers_again() -> anyhow::Result<()>
{
    init_logs();
    let etcd = Etcd::start().await?;
    let client = etcd.client();
    let key = GroupWatcher::key("c", "g", 0);
    let reg = Registration::start(client.clone(), key.clone(), "a:1", TTL).await?;
    let old = reg.lease();
    client.revoke(old).await?;
    assert_eq!(value_of(&client, &key).await, None);
    let took = eventually(
        TTL + EXPIRY_MARGIN,
        "key back under a new lease",
        || async { value_of(&client, &key).await.as_deref() == Some("a:1") },
    )
    .await?;
    assert_ne!(reg.lease(), old);
    let (kvs, _) = client.get_prefix_kvs(&key).await?;
    assert_eq!(kvs[0].lease, Some(reg.lease()));
    eprintln!("re-registered {took:?} after the lease was revoked");
    reg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reports_the_group_complete_then_incomplete_when_a_lease_expires_then_complete_again(
) -> anyhow::Result<()> {
    init_logs();
    let etcd = Etcd::start().await?;
    let client = etcd.client();
    let mut watcher = GroupWatcher::new(client.clone(), "prod", "g0", 3);
    let start = |rank: usize, addr: String| {
        Registration::start(
            client.clone(),
            GroupWatcher::key("prod", "g0", rank),
            addr,
            TTL,
        )
    };
    let r0 = start(0, "w0:1".into()).await?;
    let m = wait_membership(&mut watcher, "rank 0", |m| m.members.len() == 1).await?;
    assert!(!m.complete);
    let mut r1 = start(1, "w1:1".into()).await?;
    // Another group's workers and an out-of-range rank are not members.
    let _other = Registration::start(
        client.clone(),
        GroupWatcher::key("prod", "g1", 2),
        "x:1",
        TTL,
    )
    .await?;
    let _extra = start(3, "w3:1".into()).await?;
    let r2 = start(2, "w2:1".into()).await?;
    let formed = wait_membership(&mut watcher, "complete group", |m| m.complete).await?;
    assert_eq!(
        formed.members.values().collect::<Vec<_>>(),
        ["w0:1", "w1:1", "w2:1"]
    );

    let died = Instant::now();
    drop(r1); // rank 1 crashes
    let m = wait_membership(&mut watcher, "rank 1 gone", |m| !m.complete).await?;
    assert_eq!(m.members.keys().collect::<Vec<_>>(), [&0, &2]);
    eprintln!("watcher saw rank 1 gone {:?} after it died", died.elapsed());
    assert!(died.elapsed() < TTL + EXPIRY_MARGIN);

    r1 = start(1, "w1:2".into()).await?; // it comes back elsewhere
    let m = wait_membership(&mut watcher, "complete again", |m| m.complete).await?;
    assert_eq!(m.members[&1], "w1:2");
    assert!(!m.same_workers(&formed));
    assert_eq!(m.revisions[&0], formed.revisions[&0]);

    r1.stop().await?;
    let m = wait_membership(&mut watcher, "rank 1 revoked", |m| !m.complete).await?;
    assert!(!m.members.contains_key(&1));
    drop((r0, r2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_and_registrations_survive_an_etcd_restart_and_resync() -> anyhow::Result<()> {
    init_logs();
    let mut etcd = Etcd::start().await?;
    let client = etcd.client();
    let mut watcher = GroupWatcher::new(client.clone(), "c", "g", 2);
    let key0 = GroupWatcher::key("c", "g", 0);
    let r0 = Registration::start(client.clone(), key0.clone(), "w0:1", TTL).await?;
    let before = wait_membership(&mut watcher, "rank 0", |m| m.members.len() == 1).await?;

    // Down for longer than a keepalive period (TTL/3), shorter than the TTL.
    etcd.restart(Duration::from_secs(1)).await?;
    // Written right after the restart, around when the watcher reconnects: the re-list or the
    // watch from the listed revision must show it, whichever comes first.
    let r1 =
        Registration::start(client.clone(), GroupWatcher::key("c", "g", 1), "w1:1", TTL).await?;
    let m = wait_membership(&mut watcher, "complete after the restart", |m| m.complete).await?;
    assert_eq!(m.members[&0], "w0:1");
    assert_eq!(
        m.revisions[&0], before.revisions[&0],
        "rank 0 kept its registration"
    );

    // The watch works again: a later death is seen.
    tokio::time::sleep(TTL).await; // rank 0's keepalive has resumed on the restarted etcd
    assert_eq!(value_of(&client, &key0).await.as_deref(), Some("w0:1"));
    drop(r1);
    let m = wait_membership(&mut watcher, "rank 1 gone", |m| !m.complete).await?;
    assert_eq!(m.members.keys().collect::<Vec<_>>(), [&0]);
    drop(r0);
    Ok(())
}

#[test]
fn etcd_binary_is_found() {
    // Fails (instead of silently skipping) when etcd is missing, naming the script.
    let bin = etcd_binary().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(Path::new(&bin).is_file());
}
