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
pub trait Collective: Send {
    /// This worker's index, `0..size()`; worker 0 writes the run folder.
    fn rank(&self) -> usize;
    /// How many workers there are.
    fn size(&self) -> usize;
    /// Every worker's `bytes`, in rank order, on every worker.
    fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Arc<Vec<u8>>>, TrainError>;
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
