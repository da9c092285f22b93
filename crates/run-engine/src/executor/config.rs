//! How an executor runs: workers, leases, renewals, retries, polling.

use std::time::Duration;

/// The `<hostname>-<pid>` part of this process's worker ids.
pub fn default_worker_prefix() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    // lease_owner holds 255 bytes; leave room for the pid and the worker number.
    let host: String = host.chars().take(200).collect();
    format!("{host}-{}", std::process::id())
}

/// How an [`Executor`](super::Executor) runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// Worker tasks in this process (at least 1).
    pub workers: usize,
    /// How long a claim or renewal holds a story.
    pub lease: Duration,
    /// How often a running story's lease is renewed (a third of the lease by default).
    pub renew_every: Duration,
    /// How long an idle worker waits before looking for work again. On PostgreSQL, with
    /// [`ExecutorConfig::listen`], a notification wakes it at once; the poll is the fallback.
    pub poll_interval: Duration,
    /// On PostgreSQL, listen for stories made claimable (one connection per execution, `LISTEN
    /// run_engine`) and wake idle workers at once (default true). Turn it off behind a pooler
    /// that does not pass notifications on (PgBouncer in transaction mode).
    pub listen: bool,
    /// How many pending stories are read at a time into this process's queue of candidates,
    /// which its workers take from (each candidate goes to one worker of the process; other
    /// processes read their own, in a shuffled order, and a candidate taken meanwhile only
    /// costs a failed compare-and-swap).
    pub candidate_window: u64,
    /// The most stories one claim takes (default 256). A worker that finds nothing to run
    /// claims, in one statement, a story for itself and one for each worker of this process
    /// waiting for work (so the batch grows with the idle workers, up to this), and hands them
    /// over. While handlers take less than 20 ms on average, a claim also takes stories ahead
    /// of the workers (the whole batch), queued in this process for whichever worker is free
    /// first: their leases run meanwhile (a queued story whose lease is half gone is renewed
    /// before it starts), and they are given back on shutdown. The statement skips rows
    /// another process is claiming (`FOR UPDATE SKIP LOCKED` on
    /// PostgreSQL and MariaDB), so processes spread over the ready stories. Runs whose stories
    /// hold limits, and take-overs of expired leases, are claimed one at a time by
    /// compare-and-swap; so is everything with 1. Completions are batched the same way: the
    /// results of stories finishing at once are recorded in one write.
    pub claim_batch: usize,
    /// How long a handler has to stop after it is cancelled before it is dropped.
    pub cancel_grace: Duration,
    /// Worker ids are `<worker_prefix>-<n>`; by default `<hostname>-<pid>`. They must be unique
    /// among the workers of a run (a worker recognises its own writes by its id, after a lost
    /// reply): two executors in one process on one run need prefixes of their own.
    pub worker_prefix: String,
    /// Whether database calls that fail transiently
    /// ([`run_domain::connection::is_transient`]) are tried again, with backoff, for up to
    /// [`ExecutorConfig::retry_budget`]. On by default; off, the
    /// first such failure ends the worker (or drops the result, or the log lines), which is
    /// only good for showing what the retries are for.
    pub retry_transient: bool,
    /// How long one database call is tried again through transient failures before the worker
    /// gives up on it: long enough to ride out a server restart.
    pub retry_budget: Duration,
}

impl Default for ExecutorConfig {
    /// 4 workers, 30 s leases renewed every 10 s, 250 ms polls, 64 candidates, claims of up to
    /// 256 stories, 10 s grace,
    /// transient database failures retried for up to 30 s.
    fn default() -> Self {
        ExecutorConfig {
            workers: 4,
            lease: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            candidate_window: 64,
            claim_batch: 256,
            cancel_grace: Duration::from_secs(10),
            worker_prefix: default_worker_prefix(),
            retry_transient: true,
            retry_budget: Duration::from_secs(30),
            listen: true,
        }
    }
}

impl ExecutorConfig {
    /// Sets the number of workers (at least 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Sets the most stories one claim takes (see [`ExecutorConfig::claim_batch`]; 1 claims
    /// and records one story per statement). At most [`run_domain::batch::MAX_BATCH`].
    pub fn claim_batch(mut self, batch: usize) -> Self {
        self.claim_batch = batch.clamp(1, run_domain::batch::MAX_BATCH);
        self
    }

    /// Sets the lease (at least 100 ms), and renews it every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self.renew_every = self.lease / 3;
        self
    }

    /// Sets how often a running story's lease is renewed (at least 10 ms); call after
    /// [`ExecutorConfig::lease`], which resets it to a third of the lease. Renew several times
    /// per lease, so that renewals that fail during a database outage have time to get through.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = every.max(Duration::from_millis(10));
        self
    }

    /// Sets whether transient database failures are tried again (see
    /// [`ExecutorConfig::retry_transient`]).
    pub fn retry_transient(mut self, retry: bool) -> Self {
        self.retry_transient = retry;
        self
    }

    /// Sets how long a database call is tried again through transient failures.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The retry budget, or `None` when transient failures are not retried.
    pub(super) fn budget(&self) -> Option<Duration> {
        self.retry_transient.then_some(self.retry_budget)
    }

    /// Sets how long an idle worker waits before looking again.
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll_interval = poll;
        self
    }

    /// Sets whether to listen for notifications on PostgreSQL (see [`ExecutorConfig::listen`]).
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// Sets how long a cancelled handler has to stop.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Sets the prefix of worker ids.
    pub fn worker_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.worker_prefix = prefix.into();
        self
    }
}
