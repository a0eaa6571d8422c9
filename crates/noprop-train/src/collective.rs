//! Workers that train at once: the few collective operations a parallel
//! run needs, and the threads backend.
//!
//! A parallel NoProp-DT run gives each worker a contiguous range of the `T`
//! blocks ([`owner`]). Nothing is exchanged during an epoch: a block's pass
//! needs no other block, and every worker replays the head's updates itself
//! (see [`crate::fit`]). At the end of an epoch each worker hands its
//! blocks' state to worker 0, which evaluates and writes the run folder.
//!
//! The operations exchange bytes, never sum floating-point numbers across
//! workers: a caller that needs a sum gathers every contribution and adds
//! them in a fixed order of its own (block order), so the result does not
//! depend on how many workers there are.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::TrainError;

/// The operations a worker of a parallel run uses to talk to the others.
pub trait Collective {
    /// This worker's index, `0..size()`; worker 0 writes the run folder.
    fn rank(&self) -> usize;
    /// How many workers there are.
    fn size(&self) -> usize;
    /// Whether each worker is a process of its own (so that a process's
    /// peak memory is one worker's).
    fn own_process(&self) -> bool {
        false
    }
    /// This worker's index among the workers on its machine, and how many
    /// there are (to share out its cores and GPUs).
    fn local(&self) -> (usize, usize) {
        (self.rank(), self.size())
    }
    /// Every worker's `bytes`, in rank order, on every worker.
    fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Arc<Vec<u8>>>, TrainError>;
    /// Every worker's `bytes`, in rank order, on worker `root` (`None` on
    /// the others).
    fn gather(&self, root: usize, bytes: Vec<u8>) -> Result<Option<Vec<Arc<Vec<u8>>>>, TrainError> {
        let all = self.all_gather(bytes)?;
        Ok((self.rank() == root).then_some(all))
    }
    /// Worker `root`'s `bytes` on every worker (the others' `bytes` are ignored).
    fn broadcast(&self, root: usize, bytes: Vec<u8>) -> Result<Arc<Vec<u8>>, TrainError> {
        let mine = if self.rank() == root { bytes } else { vec![] };
        let mut all = self.all_gather(mine)?;
        Ok(all.swap_remove(root))
    }
    /// Returns once every worker has called it.
    fn barrier(&self) -> Result<(), TrainError> {
        self.all_gather(vec![]).map(|_| ())
    }
    /// Tells the other workers that this one failed with `reason`; their
    /// next (or current) operation returns an error naming this worker.
    fn abort(&self, reason: &str);
}

/// The worker (of `workers`) that trains lane `i` of `lanes`: contiguous,
/// balanced ranges, the first workers taking one lane more when `workers`
/// does not divide `lanes` (10 blocks on 3 workers: 4, 3, 3).
pub fn owner(i: usize, lanes: usize, workers: usize) -> usize {
    debug_assert!(i < lanes && workers >= 1);
    let (base, extra) = (lanes / workers, lanes % workers);
    let big = extra * (base + 1);
    if i < big {
        i / (base + 1)
    } else {
        extra + (i - big) / base.max(1)
    }
}

/// The state the threads of one group share.
struct Shared {
    size: usize,
    slots: Vec<Option<Arc<Vec<u8>>>>,
    /// Workers that have deposited in the current round.
    arrived: usize,
    /// Workers that have read the current round's result.
    departed: usize,
    /// The current round's result once everybody arrived.
    result: Option<Vec<Arc<Vec<u8>>>>,
    round: u64,
    failed: Option<(usize, String)>,
}

/// One worker of a group of threads in one process (`noprop train
/// --workers K`): each thread owns one [`ThreadCollective`].
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl ThreadCollective {
    /// The `size` workers of a new group, rank 0 first.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        let shared = Arc::new((
            Mutex::new(Shared {
                size,
                slots: vec![None; size],
                arrived: 0,
                departed: 0,
                result: None,
                round: 0,
                failed: None,
            }),
            Condvar::new(),
        ));
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A worker that panicked while holding the lock left the state as
        // it was; the failure itself is reported through `failed`.
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn failed(rank: usize, reason: &str) -> TrainError {
    TrainError::Worker {
        worker: rank,
        reason: reason.to_string(),
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.lock().size
    }

    fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Arc<Vec<u8>>>, TrainError> {
        let cv = &self.shared.1;
        let mut s = self.lock();
        // Wait until the previous round has been read by everybody.
        while s.result.is_some() && s.failed.is_none() {
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if let Some((w, r)) = &s.failed {
            return Err(failed(*w, r));
        }
        let round = s.round;
        s.slots[self.rank] = Some(Arc::new(bytes));
        s.arrived += 1;
        if s.arrived == s.size {
            let all = s
                .slots
                .iter_mut()
                .map(|b| b.take().unwrap_or_default())
                .collect();
            s.result = Some(all);
            s.arrived = 0;
            cv.notify_all();
        }
        while s.round == round && s.result.is_none() && s.failed.is_none() {
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if let Some((w, r)) = &s.failed {
            return Err(failed(*w, r));
        }
        let out = s.result.clone().unwrap_or_default();
        s.departed += 1;
        if s.departed == s.size {
            s.departed = 0;
            s.result = None;
            s.round += 1;
            cv.notify_all();
        }
        Ok(out)
    }

    fn abort(&self, reason: &str) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some((self.rank, reason.to_string()));
        }
        self.shared.1.notify_all();
    }
}

#[cfg(feature = "mpi")]
pub use mpi_backend::MpiCollective;

#[cfg(feature = "mpi")]
mod mpi_backend {
    use std::sync::Arc;

    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Count;

    use super::Collective;
    use crate::error::TrainError;

    /// The ranks of `MPI_COMM_WORLD` as the workers of a parallel run
    /// (`mpirun -n K noprop train ...`, `srun -n K ...`): one process per
    /// rank, on one node or many. MPI is finalised when this is dropped.
    pub struct MpiCollective {
        world: SimpleCommunicator,
        /// The ranks on this node: (this rank's index among them, how many).
        local: (usize, usize),
        _universe: Universe,
    }

    impl MpiCollective {
        /// Initialises MPI (once per process).
        pub fn init() -> Result<Self, TrainError> {
            let universe = mpi::initialize().ok_or_else(|| TrainError::Worker {
                worker: 0,
                reason: "MPI was initialised already in this process".into(),
            })?;
            let world = universe.world();
            let node = world.split_shared(world.rank());
            let local = (node.rank() as usize, node.size() as usize);
            Ok(Self {
                world,
                local,
                _universe: universe,
            })
        }

        fn too_big(&self, bytes: u64) -> TrainError {
            TrainError::Worker {
                worker: self.rank(),
                reason: format!(
                    "{bytes} bytes in one exchange, more than MPI's {} ",
                    Count::MAX
                ),
            }
        }

        /// Every rank's length, and the counts and offsets of the
        /// concatenation, checked against MPI's `int` counts.
        fn layout(&self, len: usize) -> Result<(Vec<Count>, Vec<Count>, usize), TrainError> {
            let mut lens = vec![0u64; self.size()];
            self.world.all_gather_into(&(len as u64), &mut lens[..]);
            let total: u64 = lens.iter().sum();
            if total > Count::MAX as u64 {
                return Err(self.too_big(total));
            }
            let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
            let offsets: Vec<Count> = counts
                .iter()
                .scan(0, |acc, &c| {
                    let at = *acc;
                    *acc += c;
                    Some(at)
                })
                .collect();
            Ok((counts, offsets, total as usize))
        }
    }

    fn split(buf: Vec<u8>, counts: &[Count], offsets: &[Count]) -> Vec<Arc<Vec<u8>>> {
        counts
            .iter()
            .zip(offsets)
            .map(|(&c, &o)| Arc::new(buf[o as usize..(o + c) as usize].to_vec()))
            .collect()
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn own_process(&self) -> bool {
            true
        }

        fn local(&self) -> (usize, usize) {
            self.local
        }

        fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Arc<Vec<u8>>>, TrainError> {
            let (counts, offsets, total) = self.layout(bytes.len())?;
            let mut buf = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &offsets[..]);
                self.world.all_gather_varcount_into(&bytes[..], &mut part);
            }
            Ok(split(buf, &counts, &offsets))
        }

        fn gather(
            &self,
            root: usize,
            bytes: Vec<u8>,
        ) -> Result<Option<Vec<Arc<Vec<u8>>>>, TrainError> {
            let (counts, offsets, total) = self.layout(bytes.len())?;
            let proc = self.world.process_at_rank(root as i32);
            if self.rank() != root {
                proc.gather_varcount_into(&bytes[..]);
                return Ok(None);
            }
            let mut buf = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &offsets[..]);
                proc.gather_varcount_into_root(&bytes[..], &mut part);
            }
            Ok(Some(split(buf, &counts, &offsets)))
        }

        fn broadcast(&self, root: usize, bytes: Vec<u8>) -> Result<Arc<Vec<u8>>, TrainError> {
            let proc = self.world.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            proc.broadcast_into(&mut len);
            if len > Count::MAX as u64 {
                return Err(self.too_big(len));
            }
            let mut buf = if self.rank() == root {
                bytes
            } else {
                vec![0u8; len as usize]
            };
            proc.broadcast_into(&mut buf[..]);
            Ok(Arc::new(buf))
        }

        fn barrier(&self) -> Result<(), TrainError> {
            self.world.barrier();
            Ok(())
        }

        /// Prints the reason and ends every rank (`MPI_Abort`): an MPI
        /// collective cannot be left half-done. Nothing committed is lost;
        /// the run resumes from its newest checkpoint.
        fn abort(&self, reason: &str) {
            let first = reason.lines().next().unwrap_or("");
            eprintln!("error: worker {}: {first}", self.rank());
            self.world.abort(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_split_into_balanced_contiguous_ranges() {
        let split = |lanes, workers| -> Vec<usize> {
            (0..lanes).map(|i| owner(i, lanes, workers)).collect()
        };
        assert_eq!(split(10, 1), vec![0; 10]);
        assert_eq!(split(10, 3), vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(split(10, 10), (0..10).collect::<Vec<_>>());
        assert_eq!(split(3, 2), vec![0, 0, 1]);
        for lanes in 1..=12 {
            for workers in 1..=lanes {
                let s = split(lanes, workers);
                assert!(s.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
                assert_eq!(*s.last().unwrap(), workers - 1, "{lanes} {workers}");
            }
        }
    }

    #[test]
    fn every_worker_gets_every_contribution_in_rank_order_many_times() {
        let group = ThreadCollective::group(4);
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut seen = vec![];
                    for round in 0..50u8 {
                        let all = c.all_gather(vec![c.rank() as u8, round]).unwrap();
                        seen.push(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>());
                        let b = c.broadcast(round as usize % 4, vec![round; 3]).unwrap();
                        assert_eq!(*b, vec![round; 3]);
                    }
                    seen
                })
            })
            .collect();
        for h in handles {
            let seen = h.join().unwrap();
            for (round, all) in seen.iter().enumerate() {
                let want: Vec<Vec<u8>> = (0..4).map(|r| vec![r, round as u8]).collect();
                assert_eq!(all, &want);
            }
        }
    }

    #[test]
    fn a_failed_worker_releases_the_others_with_its_name() {
        let mut group = ThreadCollective::group(3);
        let bad = group.pop().unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| std::thread::spawn(move || c.barrier()))
            .collect();
        bad.abort("out of memory");
        for h in handles {
            let e = h.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("worker 2") && e.contains("out of memory"), "{e}");
        }
    }
}
