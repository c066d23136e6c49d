//! A small worker pool for the many short parallel regions of packed decoding.
//!
//! Decoding one token runs ~120 (SmolLM2) to ~200 (Qwen3-0.6B) packed matmul regions of
//! 20-60 µs each. Rayon's idle workers go to sleep between them, and waking a sleeping thread
//! costs about as much as a region's work, which is why 2-thread decode gained only 1.26x over
//! one thread (NOTES.md). Here the workers stay awake between regions: after a job they spin
//! (then yield) for a short while, waiting for the next one, and only then sleep. The thread
//! that submits a job works on it too, and tasks are taken one at a time from a shared counter.
//!
//! Measured, it lost: at the Qwen3-0.6B shape on 2 cores, 2-thread decode ran at 65 tok/s with
//! this pool against 71 with rayon (NOTES.md, "Decode threads: a spinning pool"), because the
//! other ops of a decode step (candle's attention, norms, RoPE) run on rayon's threads, and a
//! spinning worker takes a core from them. So it is opt-in (`TERN_POOL=spin`), kept for
//! measuring on other CPUs; the step that would let it win is running those ops on it too.
//!
//! One job runs at a time; a submitter that finds the pool busy (another thread is decoding
//! too, or tests run in parallel) runs its tasks through rayon instead, so results never depend
//! on which path ran. The plain reference is a sequential loop over the tasks; the tests
//! compare the two.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins, then yields, waiting for the next job before it sleeps:
/// longer than the gaps between a token's matmuls (norms, rope, attention), short enough
/// that a worker never holds a core for long once decoding has stopped.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_millis(2);

/// The job being run: `f(i)` for every task index `i < tasks`.
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job (release): a worker that sees a new value reads the job.
    generation: AtomicU64,
    /// The current job (valid while `pending > 0`).
    job: Mutex<Option<SendJob>>,
    tasks: AtomicUsize,
    /// Next task index to take.
    next: AtomicUsize,
    /// Workers still working on the current job.
    pending: AtomicUsize,
    /// Workers asleep (or about to be): the submitter wakes them only when this is nonzero.
    sleepers: AtomicUsize,
    wake: Condvar,
    /// Guards the sleep/wake handshake (its value is unused).
    gate: Mutex<()>,
    /// A task of the current job panicked on a worker.
    panicked: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync` and outlives every use (`SpinPool::run` waits for the workers).
unsafe impl Send for SendJob {}

/// The pool: `workers` threads plus the submitting thread.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: usize,
    /// Held by the thread whose job is running.
    busy: Mutex<()>,
}

impl SpinPool {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            gate: Mutex::new(()),
            panicked: std::sync::atomic::AtomicBool::new(false),
        });
        for k in 0..workers {
            let s = Arc::clone(&shared);
            // A pool that cannot start its threads still works: the submitter runs every task.
            let _ = std::thread::Builder::new()
                .name(format!("tern-spin-{k}"))
                .spawn(move || worker(&s));
        }
        Self {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process's pool. Opt-in: `TERN_POOL=spin` sizes it by rayon's thread count when
    /// first used (`--threads`); otherwise it has no workers and every job runs through rayon.
    /// Rayon stays the default because it measured faster: the other ops of a decode step
    /// (candle's attention and norms) run on rayon's threads, and the spinning workers took
    /// cores from them (NOTES.md, "Decode threads: a spinning pool, measured").
    pub fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let spin = std::env::var("TERN_POOL").is_ok_and(|v| v == "spin");
            let workers = if spin {
                rayon::current_num_threads().saturating_sub(1)
            } else {
                0
            };
            SpinPool::new(workers)
        })
    }

    /// Runs `f(i)` for every `i < tasks`, each exactly once, on this thread and the workers;
    /// returns when all have finished. Falls back to rayon when the pool is busy or has no
    /// workers.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        if self.workers == 0 {
            (0..tasks).into_par_iter().for_each(f);
            return;
        }
        // A poisoned lock only records an earlier panic, which `run` already passed on.
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..tasks).into_par_iter().for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY (lifetime erasure): the pointer is used only until `pending` drops to zero,
        // which this function waits for before it returns and `f` goes out of scope.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.tasks.store(tasks, Ordering::SeqCst);
        s.next.store(0, Ordering::SeqCst);
        s.pending.store(self.workers, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _gate = s.gate.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // A panic here must not unwind past the workers still using `f`: wait for them first.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, f)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) > 0 {
            // A worker that lost its core (a busy machine) finishes sooner if we let it run.
            spins += 1;
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let theirs = s.panicked.swap(false, Ordering::SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if theirs {
            panic!("a task of a spin-pool job panicked on a worker thread");
        }
    }
}

/// Takes task indices from the shared counter until none is left.
fn take_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.tasks.load(Ordering::Acquire);
    loop {
        let i = s.next.fetch_add(1, Ordering::AcqRel);
        if i >= n {
            return;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    // Every job counts on every worker (`pending`), including one submitted before this thread
    // first ran: start from the pool's first generation, not from whatever it is now.
    let mut seen = 0;
    loop {
        seen = wait_for_job(s, seen);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(job)) = job {
            // SAFETY: the submitter keeps the job alive until `pending` reaches zero.
            let f = unsafe { &*job };
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, f)));
            if ok.is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until the generation moves past `seen` (spin, then yield, then sleep); returns it.
fn wait_for_job(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        let g = s.generation.load(Ordering::Acquire);
        if g != seen {
            return g;
        }
        round = round.wrapping_add(1);
        if !round.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let waited = start.elapsed();
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < YIELD {
            std::thread::yield_now();
        } else {
            let gate = s.gate.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate;
            while s.generation.load(Ordering::SeqCst) == seen {
                gate = s.wake.wait(gate).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            return s.generation.load(Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// The reference: every task once, in order, on one thread.
    fn sequential(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..tasks).for_each(f)
    }

    fn counts_after(run: impl Fn(usize, &(dyn Fn(usize) + Sync)), tasks: usize) -> Vec<u32> {
        let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
        run(tasks, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        hits.iter().map(|h| h.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn every_task_runs_exactly_once_like_the_sequential_loop() {
        let pool = SpinPool::new(3);
        for tasks in [0, 1, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let got = counts_after(|n, f| pool.run(n, f), tasks);
                assert_eq!(got, counts_after(sequential, tasks), "{tasks} tasks");
            }
        }
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_job() {
        let pool = SpinPool::new(1);
        std::thread::sleep(YIELD + Duration::from_millis(20));
        assert_eq!(counts_after(|n, f| pool.run(n, f), 9), vec![1; 9]);
    }

    #[test]
    fn concurrent_submitters_each_get_their_own_results() {
        let pool = SpinPool::new(2);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let pool = &pool;
                scope.spawn(move || {
                    for _ in 0..100 {
                        let out: Vec<AtomicUsize> = (0..33).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(out.len(), &|i| out[i].store(i * t + 1, Ordering::Relaxed));
                        let got: Vec<usize> =
                            out.iter().map(|v| v.load(Ordering::Relaxed)).collect();
                        assert_eq!(got, (0..33).map(|i| i * t + 1).collect::<Vec<_>>());
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_panics_the_submitter_and_the_pool_keeps_working() {
        let pool = SpinPool::new(2);
        for _ in 0..5 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|i| assert!(i != 40, "task 40"))
            }));
            assert!(r.is_err());
            assert_eq!(counts_after(|n, f| pool.run(n, f), 16), vec![1; 16]);
        }
    }
}
