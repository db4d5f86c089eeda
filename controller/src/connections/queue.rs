//! The queue through which other tasks (the overlay hub, drives, rollouts, the API) send messages
//! to one node's control connection. It is bounded: a node that stops reading would otherwise make
//! the controller hold every netmap delta and command meant for it. When the queue is full the
//! message is not queued and the connection is told to close; the agent reconnects and gets a fresh
//! full state (netmap, policy, steps), so nothing is lost for a node that was merely slow.

use std::sync::Arc;

use shoal_proto::ControllerMsg;
use tokio::sync::{mpsc, Notify};

/// Messages queued for one connection before it counts as a consumer that stopped reading. A netmap
/// change is one delta per affected node, so even a fleet-wide change queues one message per agent.
pub const NODE_QUEUE_CAPACITY: usize = 4096;

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The connection stopped reading: it is being closed.
    #[error(
        "the node's queue is full: its connection is closed as a consumer that stopped reading"
    )]
    Full,
    /// The connection is gone.
    #[error("the node's connection is gone")]
    Closed,
}

/// The sending side, cloned by whoever needs to reach the node.
#[derive(Debug, Clone)]
pub struct NodeTx {
    tx: mpsc::Sender<ControllerMsg>,
    overflow: Arc<Notify>,
}

/// The connection's side.
#[derive(Debug)]
pub struct NodeRx {
    rx: mpsc::Receiver<ControllerMsg>,
    overflow: Arc<Notify>,
}

/// A queue holding at most `capacity` messages.
pub fn node_queue(capacity: usize) -> (NodeTx, NodeRx) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflow = Arc::new(Notify::new());
    (
        NodeTx {
            tx,
            overflow: overflow.clone(),
        },
        NodeRx { rx, overflow },
    )
}

impl NodeTx {
    /// Queues a message without waiting. A full queue wakes the connection to close itself.
    pub fn send(&self, msg: ControllerMsg) -> Result<(), QueueError> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.notify_one();
                Err(QueueError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
        }
    }
}

impl NodeRx {
    /// The next queued message.
    pub async fn recv(&mut self) -> Option<ControllerMsg> {
        self.rx.recv().await
    }

    /// A queued message, if one is there now.
    pub fn try_recv(&mut self) -> Result<ControllerMsg, mpsc::error::TryRecvError> {
        self.rx.try_recv()
    }

    /// Resolves once a sender found the queue full.
    pub async fn overflowed(&self) {
        self.overflow.notified().await
    }

    /// The signal [`NodeRx::overflowed`] waits on, to wait for it while receiving (a full queue is
    /// remembered until someone waits).
    pub fn overflow_signal(&self) -> Arc<Notify> {
        self.overflow.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_and_wakes_the_connection() {
        let (tx, mut rx) = node_queue(2);
        let msg = || ControllerMsg::RotateKey { reason: "r".into() };
        assert_eq!(tx.send(msg()), Ok(()));
        assert_eq!(tx.send(msg()), Ok(()));
        assert_eq!(tx.send(msg()), Err(QueueError::Full));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.overflowed())
            .await
            .expect("woken");
        assert!(
            rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err(),
            "only what fitted was queued"
        );
        drop(rx);
        assert_eq!(tx.send(msg()), Err(QueueError::Closed));
    }
}
