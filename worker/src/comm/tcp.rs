//! A tensor-parallel communicator over TCP: rank 0 is the hub of a star. Every collective costs
//! two messages per non-root rank (up and down); on loopback that is tens of microseconds, small
//! next to a CPU decode step. Sums are taken at the hub in rank order, so results are
//! deterministic. Sockets have read timeouts, so a dead peer turns into an error, not a hang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::Communicator;
use crate::error::{Result, WorkerError};
use crate::step_trace::{phase, Phase};

/// How long a rank waits for a peer's message before the group is declared broken. Steps are
/// short; a peer silent for this long is gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long joining the group may take. The coordinator only asks once every worker answers,
/// so joins take milliseconds; a rank that has not joined by then is gone, and rank 0 must not
/// sit in `accept` (blocking its runner) much longer than that.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

fn comm_err(detail: impl Into<String>) -> WorkerError {
    WorkerError::Communicator {
        detail: detail.into(),
    }
}

/// The rendezvous socket rank 0 opens before the group forms. Its address is the group's id.
#[derive(Debug)]
pub struct Rendezvous {
    listener: TcpListener,
}

impl Rendezvous {
    /// Opens a listening socket on `host` (an IP the other ranks can reach) and an ephemeral port.
    pub fn open(host: &str) -> Result<Self> {
        let listener = TcpListener::bind((host, 0))
            .map_err(|e| comm_err(format!("cannot open a rendezvous socket on {host}: {e}")))?;
        Ok(Self { listener })
    }

    /// The id other ranks join with: the socket address as text.
    pub fn id(&self) -> Result<Vec<u8>> {
        let addr = self
            .listener
            .local_addr()
            .map_err(|e| comm_err(format!("rendezvous address: {e}")))?;
        Ok(addr.to_string().into_bytes())
    }
}

/// One rank's end of the star.
#[derive(Debug)]
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    /// Rank 0: the streams of ranks 1..world_size, in rank order. Other ranks: the hub's stream.
    peers: Vec<TcpStream>,
    /// Scratch for the hub's receive, reused across calls.
    scratch: Vec<f32>,
}

fn configure(stream: &TcpStream) -> Result<()> {
    stream
        .set_nodelay(true)
        .and_then(|_| stream.set_read_timeout(Some(PEER_TIMEOUT)))
        .map_err(|e| comm_err(format!("socket options: {e}")))
}

impl TcpCommunicator {
    /// Rank 0: waits until every other rank has connected through `rendezvous`.
    pub fn accept(rendezvous: Rendezvous, world_size: usize) -> Result<Self> {
        let listener = rendezvous.listener;
        listener
            .set_nonblocking(true)
            .map_err(|e| comm_err(format!("rendezvous socket: {e}")))?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut slots: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| comm_err(format!("peer socket: {e}")))?;
                    configure(&stream)?;
                    let mut rank = [0u8; 4];
                    stream
                        .read_exact(&mut rank)
                        .map_err(|e| comm_err(format!("peer hello: {e}")))?;
                    let rank = u32::from_le_bytes(rank) as usize;
                    match slots.get_mut(rank.wrapping_sub(1)) {
                        Some(slot @ None) => *slot = Some(stream),
                        _ => return Err(comm_err(format!("unexpected or duplicate rank {rank}"))),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing = slots.iter().filter(|s| s.is_none()).count();
                        return Err(comm_err(format!(
                            "{missing} of {} ranks did not join within {JOIN_TIMEOUT:?}",
                            world_size - 1
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(comm_err(format!("accept: {e}"))),
            }
        }
        Ok(Self {
            rank: 0,
            world_size,
            peers: slots.into_iter().flatten().collect(),
            scratch: Vec::new(),
        })
    }

    /// Ranks 1..: connects to rank 0 at the address `id` holds.
    pub fn connect(id: &[u8], rank: usize, world_size: usize) -> Result<Self> {
        let text = std::str::from_utf8(id).map_err(|_| comm_err("the group id is not UTF-8"))?;
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| comm_err(format!("the group id {text:?} is not a socket address")))?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("rank {rank}: connecting to {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(comm_err(format!("cannot reach rank 0 at {addr}: {e}"))),
            }
        };
        configure(&stream)?;
        stream
            .write_all(&(rank as u32).to_le_bytes())
            .map_err(|e| comm_err(format!("hello to rank 0: {e}")))?;
        Ok(Self {
            rank,
            world_size,
            peers: vec![stream],
            scratch: Vec::new(),
        })
    }
}

impl TcpCommunicator {
    /// A whole group inside this process, over loopback: rank `r` is element `r`. For tests and
    /// benchmarks that run every rank on its own thread.
    pub fn local_group(world_size: usize) -> Result<Vec<Self>> {
        let rv = Rendezvous::open("127.0.0.1")?;
        let id = rv.id()?;
        let joiners: Vec<_> = (1..world_size)
            .map(|r| {
                let id = id.clone();
                std::thread::spawn(move || Self::connect(&id, r, world_size))
            })
            .collect();
        let mut all = vec![Self::accept(rv, world_size)?];
        for j in joiners {
            all.push(
                j.join()
                    .map_err(|_| comm_err("a joining thread panicked"))??,
            );
        }
        Ok(all)
    }
}

fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    stream
        .write_all(bytes)
        .map_err(|e| comm_err(format!("send to peer: {e}")))
}

fn recv(stream: &mut TcpStream, bytes: &mut [u8]) -> Result<()> {
    stream
        .read_exact(bytes)
        .map_err(|e| comm_err(format!("receive from peer (is it still running?): {e}")))
}

impl TcpCommunicator {
    /// After a failed collective the group is broken: closing every socket makes the peers'
    /// pending reads fail at once instead of waiting out `PEER_TIMEOUT`.
    fn poison<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            for peer in &self.peers {
                let _ = peer.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    fn all_reduce_inner(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.rank == 0 {
            self.scratch.resize(buf.len(), 0.0);
            for peer in &mut self.peers {
                recv(peer, bytemuck::cast_slice_mut(&mut self.scratch))?;
                for (acc, x) in buf.iter_mut().zip(&self.scratch) {
                    *acc += *x;
                }
            }
            for peer in &mut self.peers {
                send(peer, bytemuck::cast_slice(buf))?;
            }
        } else {
            let hub = &mut self.peers[0];
            send(hub, bytemuck::cast_slice(buf))?;
            recv(hub, bytemuck::cast_slice_mut(buf))?;
        }
        Ok(())
    }

    fn gather_inner(&mut self, buf: &[f32]) -> Result<Option<Vec<f32>>> {
        if self.rank == 0 {
            let mut out = buf.to_vec();
            for peer in &mut self.peers {
                let mut len = [0u8; 8];
                recv(peer, &mut len)?;
                let start = out.len();
                out.resize(start + u64::from_le_bytes(len) as usize, 0.0);
                recv(peer, bytemuck::cast_slice_mut(&mut out[start..]))?;
            }
            Ok(Some(out))
        } else {
            let hub = &mut self.peers[0];
            send(hub, &(buf.len() as u64).to_le_bytes())?;
            send(hub, bytemuck::cast_slice(buf))?;
            Ok(None)
        }
    }

    fn broadcast_inner(&mut self, buf: &mut [u32]) -> Result<()> {
        if self.rank == 0 {
            for peer in &mut self.peers {
                send(peer, bytemuck::cast_slice(buf))?;
            }
        } else {
            recv(&mut self.peers[0], bytemuck::cast_slice_mut(buf))?;
        }
        Ok(())
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let r = phase(Phase::AllReduce, || self.all_reduce_inner(buf));
        self.poison(r)
    }

    fn gather_to_root(&mut self, buf: &[f32]) -> Result<Option<Vec<f32>>> {
        let r = self.gather_inner(buf);
        self.poison(r)
    }

    fn broadcast_from_root(&mut self, buf: &mut [u32]) -> Result<()> {
        let r = self.broadcast_inner(buf);
        self.poison(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(world: usize) -> Vec<TcpCommunicator> {
        TcpCommunicator::local_group(world).unwrap()
    }

    #[test]
    fn all_reduce_gather_and_broadcast_agree_across_three_ranks() {
        let comms = group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut buf = vec![r, 10.0 * r, 1.0];
                    c.all_reduce_sum(&mut buf).unwrap();
                    let gathered = c.gather_to_root(&vec![r; c.rank() + 1]).unwrap();
                    let mut tokens = if c.rank() == 0 {
                        vec![7, 8]
                    } else {
                        vec![0, 0]
                    };
                    c.broadcast_from_root(&mut tokens).unwrap();
                    (buf, gathered, tokens)
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (buf, gathered, tokens) = h.join().unwrap();
            assert_eq!(buf, vec![3.0, 30.0, 3.0]);
            assert_eq!(tokens, vec![7, 8]);
            if rank == 0 {
                assert_eq!(gathered.unwrap(), vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            } else {
                assert!(gathered.is_none());
            }
        }
    }

    #[test]
    fn a_failure_at_the_hub_reaches_every_other_rank_at_once() {
        let mut comms = group(3);
        let third = comms.pop().unwrap();
        drop(comms.pop().unwrap()); // rank 1 dies
        let waiting = std::thread::spawn(move || {
            let mut third = third;
            let mut buf = vec![1.0f32; 4];
            let started = std::time::Instant::now();
            (third.all_reduce_sum(&mut buf).is_err(), started.elapsed())
        });
        let mut buf = vec![1.0f32; 4];
        assert!(comms[0].all_reduce_sum(&mut buf).is_err());
        let (failed, waited) = waiting.join().unwrap();
        assert!(failed, "rank 2 sees the failure");
        assert!(
            waited < Duration::from_secs(10),
            "rank 2 did not wait for its timeout: {waited:?}"
        );
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let mut comms = group(2);
        let peer = comms.pop().unwrap();
        drop(peer);
        let mut buf = vec![1.0f32; 4];
        assert!(comms[0].all_reduce_sum(&mut buf).is_err());
    }
}
