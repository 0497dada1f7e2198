//! A coordinator process: its Raft replica, and one gRPC address that carries both the Raft
//! traffic between coordinators and the cluster API (a proposal sent to a follower is forwarded
//! to the leader). Raft messages leave through per-peer queues drained by async tasks, so the
//! Ready loop never waits on the network.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::cluster_server::{Cluster, ClusterServer};
use tandem_proto::v1::raft_client::RaftClient;
use tandem_proto::v1::raft_server::{Raft, RaftServer};
use tandem_proto::v1::{ProposeRequest, ProposeResponse, RaftAck, RaftMessage, StatusRequest, StatusResponse};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::replica::{Inbox, Replica, ReplicaError, Timing, Transport};
use crate::state::Proposal;

/// How long a proposal or a read may wait for the group.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `1=host:port,2=host:port,...`: every coordinator's id and gRPC address.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("peer id {id:?} is not a number"))?;
        if id == 0 {
            return Err("peer ids start at 1".into());
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("peer {id} given twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

/// Sends Raft messages to peers over gRPC, one queue and task per peer.
struct GrpcTransport {
    queues: HashMap<u64, mpsc::UnboundedSender<Message>>,
}

impl GrpcTransport {
    fn start(me: u64, peers: &BTreeMap<u64, String>, rt: &tokio::runtime::Handle) -> Self {
        let mut queues = HashMap::new();
        for (&id, addr) in peers.iter().filter(|(id, _)| **id != me) {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(drain(format!("http://{addr}"), rx));
            queues.insert(id, tx);
        }
        GrpcTransport { queues }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msg: Message) {
        if let Some(q) = self.queues.get(&msg.to) {
            let _ = q.send(msg);
        }
    }
}

/// Delivers one peer's queue; a peer that is down loses its messages (Raft resends).
async fn drain(url: String, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut client: Option<RaftClient<tonic::transport::Channel>> = None;
    while let Some(msg) = rx.recv().await {
        let Ok(bytes) = msg.write_to_bytes() else { continue };
        if client.is_none() {
            let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
                Ok(e) => e.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(2)),
                Err(_) => return,
            };
            client = endpoint.connect().await.ok().map(RaftClient::new);
        }
        if let Some(c) = client.as_mut()
            && c.step(RaftMessage { message: bytes }).await.is_err()
        {
            client = None;
        }
    }
}

struct RaftService {
    inbox: Inbox,
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn step(&self, req: Request<RaftMessage>) -> Result<Response<RaftAck>, Status> {
        let msg = Message::parse_from_bytes(&req.into_inner().message)
            .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
        if !self.inbox.deliver(msg) {
            return Err(Status::unavailable("this coordinator is stopping"));
        }
        Ok(Response::new(RaftAck {}))
    }
}

struct ClusterService {
    replica: Arc<Replica>,
    peers: BTreeMap<u64, String>,
}

fn status_of(e: ReplicaError) -> Status {
    match e {
        ReplicaError::NotLeader { leader } => {
            Status::unavailable(format!("no leader reachable (last known: {leader})"))
        }
        ReplicaError::Timeout => Status::deadline_exceeded("the coordinator group did not answer in time"),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn propose(&self, req: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        let req = req.into_inner();
        let p: Proposal =
            serde_json::from_str(&req.proposal_json).map_err(|e| Status::invalid_argument(format!("proposal: {e}")))?;
        let replica = self.replica.clone();
        let result = tokio::task::spawn_blocking(move || replica.propose(p, REQUEST_TIMEOUT))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match result {
            Ok(reply) => {
                let reply_json = serde_json::to_string(&reply).map_err(|e| Status::internal(e.to_string()))?;
                Ok(Response::new(ProposeResponse { reply_json }))
            }
            // A follower hands the proposal to the leader it knows (once: no loops).
            Err(ReplicaError::NotLeader { leader }) if leader != 0 => {
                let addr = self.peers.get(&leader).ok_or_else(|| Status::unavailable("leader address unknown"))?;
                let mut client = ClusterClient::connect(format!("http://{addr}"))
                    .await
                    .map_err(|e| Status::unavailable(format!("leader {leader} at {addr}: {e}")))?;
                let forwarded = client.propose(ProposeRequest { proposal_json: req.proposal_json }).await?;
                Ok(Response::new(forwarded.into_inner()))
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.replica.status();
        let replica = self.replica.clone();
        let state = tokio::task::spawn_blocking(move || replica.read(Duration::from_secs(2)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let state_json = match state {
            Ok(state) => serde_json::to_string(&state).map_err(|e| Status::internal(e.to_string()))?,
            Err(_) => String::new(),
        };
        Ok(Response::new(StatusResponse {
            id: s.id,
            leader: s.leader,
            term: s.term,
            commit: s.commit,
            applied: s.applied,
            voters: s.voters,
            state_json,
        }))
    }
}

/// Runs coordinator `id` of `peers` (its own address among them) with its data in `dir`,
/// until `shutdown` resolves.
pub async fn serve(
    id: u64,
    peers: BTreeMap<u64, String>,
    dir: &Path,
    timing: Timing,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr: SocketAddr = peers
        .get(&id)
        .ok_or_else(|| format!("coordinator {id} is not among the peers"))?
        .parse()
        .map_err(|e| format!("address of coordinator {id}: {e}"))?;
    let voters: Vec<u64> = peers.keys().copied().collect();
    let transport = GrpcTransport::start(id, &peers, &tokio::runtime::Handle::current());
    let replica = Arc::new(Replica::start(id, &voters, dir, transport, timing)?);
    let raft = RaftService { inbox: replica.inbox() };
    let cluster = ClusterService { replica: replica.clone(), peers };
    tonic::transport::Server::builder()
        .add_service(RaftServer::new(raft))
        .add_service(ClusterServer::new(cluster))
        .serve_with_shutdown(addr, shutdown)
        .await?;
    Ok(())
}
