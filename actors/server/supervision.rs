//! How the supervisor learns that a child died: every child actor holds a
//! [`DeathNotice`], which tells the supervisor when it is dropped. An actor is
//! dropped when it stops *and* when a handler panics (the unwinding drops
//! it), so a crash can never go unnoticed, unlike actix's `Supervised`, which
//! only sees orderly stops. This module must never restart anything itself.

use actix::prelude::*;
use kvcoord_transport::InstanceKey;

/// A child of the supervisor has gone.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub enum ChildExited {
    CopyLane { lane: u32, generation: u64 },
    Instance { key: InstanceKey, generation: u64 },
}

/// Sends its message to the supervisor when dropped.
pub struct DeathNotice {
    supervisor: Recipient<ChildExited>,
    message: ChildExited,
}

impl DeathNotice {
    pub fn new(supervisor: Recipient<ChildExited>, message: ChildExited) -> Self {
        DeathNotice { supervisor, message }
    }
}

impl Drop for DeathNotice {
    fn drop(&mut self) {
        self.supervisor.do_send(self.message.clone());
    }
}
