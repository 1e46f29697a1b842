//! The worker's threads for loads, unloads and requests: a thread per job while the pids limit
//! grants one; past it, a job waits for a running thread to take it next (requests beyond the
//! limit queue instead of failing), and jobs are refused only when no thread runs that would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Work for a thread, and what to do instead when it can never run (with why).
pub(super) struct Job {
    /// The work.
    pub run: Box<dyn FnOnce() + Send>,
    /// Told why no thread will ever run it.
    pub refuse: Box<dyn FnOnce(String) + Send>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Job>,
    /// Threads that run jobs, or are being started to.
    running: usize,
}

/// The pool: threads start per job and end when nothing waits.
#[derive(Default, Clone)]
pub(super) struct Threads {
    queue: Arc<Mutex<Queue>>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

impl Threads {
    /// Runs `job` on a thread of its own, or after a running thread's job.
    pub fn run(&self, job: Job) {
        self.run_with(job, |work| {
            std::thread::Builder::new().spawn(work).map(drop)
        });
    }

    /// [`Threads::run`] with `spawn` starting the thread.
    fn run_with(
        &self,
        job: Job,
        spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> std::io::Result<()>,
    ) {
        {
            let mut q = lock(&self.queue);
            q.pending.push_back(job);
            q.running += 1;
        }
        let queue = self.queue.clone();
        let Err(e) = spawn(Box::new(move || drain(&queue))) else {
            return;
        };
        let stranded: Vec<Job> = {
            let mut q = lock(&self.queue);
            q.running -= 1;
            // A running thread takes every waiting job before it ends.
            if q.running > 0 {
                return;
            }
            q.pending.drain(..).collect()
        };
        let why =
            format!("the worker cannot start a thread ({e}); its pids limit is probably reached");
        for job in stranded {
            (job.refuse)(why.clone());
        }
    }
}

/// A thread's life: jobs until none waits.
fn drain(queue: &Mutex<Queue>) {
    loop {
        let job = {
            let mut q = lock(queue);
            match q.pending.pop_front() {
                Some(job) => job,
                None => {
                    q.running -= 1;
                    return;
                }
            }
        };
        // A job that panics must not take its thread's count with it: later jobs would wait
        // for a thread that is gone.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.run));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A job that reports `name` ran, or was refused, on `tx`.
    fn job(name: &'static str, tx: &mpsc::Sender<String>) -> Job {
        let (ran, refused) = (tx.clone(), tx.clone());
        Job {
            run: Box::new(move || ran.send(format!("{name} ran")).unwrap()),
            refuse: Box::new(move |why| refused.send(format!("{name} refused: {why}")).unwrap()),
        }
    }

    fn no_thread(_: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
    }

    #[test]
    fn past_the_thread_limit_jobs_wait_for_a_running_thread() {
        let threads = Threads::default();
        let (tx, rx) = mpsc::channel();
        // The first job's thread holds until released, as a long request does.
        let (release, hold) = mpsc::channel::<()>();
        let first_tx = tx.clone();
        threads.run(Job {
            run: Box::new(move || {
                hold.recv().unwrap();
                first_tx.send("first ran".into()).unwrap();
            }),
            refuse: Box::new(|_| unreachable!()),
        });
        threads.run_with(job("second", &tx), no_thread);
        threads.run_with(job("third", &tx), no_thread);
        release.send(()).unwrap();
        let got: Vec<String> = rx.iter().take(3).collect();
        assert_eq!(got, ["first ran", "second ran", "third ran"]);
    }

    #[test]
    fn with_no_thread_running_a_job_is_refused_with_why() {
        let threads = Threads::default();
        let (tx, rx) = mpsc::channel();
        threads.run_with(job("lonely", &tx), no_thread);
        let got = rx.recv().unwrap();
        assert!(
            got.starts_with("lonely refused") && got.contains("pids limit"),
            "{got}"
        );
        assert_eq!(lock(&threads.queue).running, 0);
        // Threads come back once the limit allows.
        threads.run(job("later", &tx));
        assert_eq!(rx.recv().unwrap(), "later ran");
    }
}
