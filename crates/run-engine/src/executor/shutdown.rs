//! Stopping an execution early: drain (finish what runs) or give leases back.

use std::sync::Arc;
use tokio::sync::watch;

/// How far a shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShutdownLevel {
    /// Working normally.
    Running,
    /// Claim nothing new; let running stories finish.
    Drain,
    /// Claim nothing new; stop running stories and give their leases back (the attempt is not
    /// counted), unless they finish within the grace period.
    GiveBack,
}

/// Asks an executor to stop: cheap to clone, shared with signal handlers.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<ShutdownLevel>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// Not shutting down.
    pub fn new() -> Shutdown {
        let (tx, _) = watch::channel(ShutdownLevel::Running);
        Shutdown { tx: Arc::new(tx) }
    }

    /// Stop claiming; running stories finish.
    pub fn drain(&self) {
        self.raise(ShutdownLevel::Drain);
    }

    /// Stop claiming; running stories are stopped and given back.
    pub fn give_back(&self) {
        self.raise(ShutdownLevel::GiveBack);
    }

    /// The current level.
    pub fn level(&self) -> ShutdownLevel {
        *self.tx.borrow()
    }

    pub(super) fn raise(&self, to: ShutdownLevel) {
        self.tx.send_if_modified(|level| {
            if to > *level {
                *level = to;
                true
            } else {
                false
            }
        });
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<ShutdownLevel> {
        self.tx.subscribe()
    }
}
