//! A tensor-parallel group whose ranks are threads of this process, each owning its own runner
//! and backend (a CUDA context is bound to the thread that creates it, and NCCL communicators are
//! not `Send`). For numerical checks and device benchmarks that drive the runner directly,
//! without gRPC; `tpserve serve` runs one worker process per rank instead.

use std::sync::mpsc;
use std::sync::Arc;

use crate::backend::{create_backend, DeviceChoice};
use crate::error::{Result, WorkerError};
use crate::runner::Runner;

type Job = Box<dyn FnOnce(&mut Runner) + Send>;

/// The ranks' threads.
pub struct ThreadGroup {
    ranks: Vec<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ThreadGroup {
    /// Starts `world_size` ranks on `device` (rank r on GPU r for CUDA) and joins them into one
    /// group; CPU ranks get `cpu_threads` threads each for their parallel work.
    pub fn start(device: DeviceChoice, world_size: usize, cpu_threads: usize) -> Result<Self> {
        let mut ranks = Vec::with_capacity(world_size);
        let mut threads = Vec::with_capacity(world_size);
        let mut started = Vec::with_capacity(world_size);
        for rank in 0..world_size {
            let (tx, rx) = mpsc::channel::<Job>();
            let (ok_tx, ok_rx) = mpsc::channel::<Result<()>>();
            let handle = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    let device = match device {
                        DeviceChoice::Cuda(None) => DeviceChoice::Cuda(Some(rank)),
                        other => other,
                    };
                    match create_backend(device, "127.0.0.1".into(), cpu_threads, rank) {
                        Ok(backend) => {
                            let _ = ok_tx.send(Ok(()));
                            let mut runner = Runner::new(backend);
                            while let Ok(job) = rx.recv() {
                                job(&mut runner);
                            }
                        }
                        Err(e) => {
                            let _ = ok_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| WorkerError::Device {
                    detail: format!("spawning rank {rank}: {e}"),
                })?;
            ranks.push(tx);
            threads.push(handle);
            started.push(ok_rx);
        }
        for rx in started {
            rx.recv().map_err(|_| WorkerError::Device {
                detail: "a rank thread died at start".into(),
            })??;
        }
        let group = Self { ranks, threads };
        let id = group.on_rank(0, move |r| r.communicator_id(world_size))?;
        let id = Arc::new(id);
        group.on_all(move |rank, r| r.init_communicator(&id, rank, world_size))?;
        Ok(group)
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Runs `f` on one rank and waits for it.
    pub fn on_rank<T: Send + 'static>(
        &self,
        rank: usize,
        f: impl FnOnce(&mut Runner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.ranks[rank]
            .send(Box::new(move |r: &mut Runner| {
                let _ = tx.send(f(r));
            }))
            .map_err(|_| gone(rank))?;
        rx.recv().map_err(|_| gone(rank))?
    }

    /// Runs `f` on every rank at once (collectives inside need all ranks) and returns each
    /// rank's answer, in rank order; the first error wins.
    pub fn on_all<T: Send + 'static>(
        &self,
        f: impl Fn(usize, &mut Runner) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Vec<T>> {
        let f = Arc::new(f);
        let mut answers = Vec::with_capacity(self.ranks.len());
        for (rank, sender) in self.ranks.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let f = f.clone();
            sender
                .send(Box::new(move |r: &mut Runner| {
                    let _ = tx.send(f(rank, r));
                }))
                .map_err(|_| gone(rank))?;
            answers.push(rx);
        }
        answers
            .into_iter()
            .enumerate()
            .map(|(rank, rx)| rx.recv().map_err(|_| gone(rank))?)
            .collect()
    }
}

fn gone(rank: usize) -> WorkerError {
    WorkerError::Device {
        detail: format!("rank {rank}'s thread has stopped (it panicked)"),
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        self.ranks.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
