//! A worker started with a group token refuses a coordinator (any gRPC caller) that does not
//! present it, and answers one that does: the real `tpserve-worker` binary, called over gRPC.
//! (Every other end-to-end test runs spawned workers, which get a random token from the
//! coordinator: they show the coordinator presents it.)

use tpserve_e2e::spawn_worker;
use tpserve_proto::worker_client::WorkerClient;
use tpserve_proto::{InfoRequest, WORKER_TOKEN_ENV, WORKER_TOKEN_METADATA};

const TOKEN: &str = "group-token-0123456789abcdef";

async fn info(addr: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(InfoRequest::default());
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert(WORKER_TOKEN_METADATA, t.parse().unwrap());
    }
    client.info(request).await.map(|_| ())
}

#[tokio::test]
async fn a_worker_with_a_token_refuses_callers_without_it() {
    let (mut child, addr) = spawn_worker(&[], &[(WORKER_TOKEN_ENV, TOKEN)]).await;

    for wrong in [None, Some("group-token-0123456789abcdeX"), Some("x")] {
        let refused = info(&addr, wrong).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        assert!(refused.message().contains("token"), "{}", refused.message());
    }
    info(&addr, Some(TOKEN))
        .await
        .expect("the right token is answered");
    child.kill().await.unwrap();
}
