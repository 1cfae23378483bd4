//! The pinned connection holding a client's state dropped (a failover, a
//! blip, a killed server): keep the client where what it had can be given a
//! clear answer (issue 18), close it where it cannot. The decision is
//! [`crate::upstream::maintenance::pinned::after_lost`].

use super::*;
use crate::upstream::maintenance::pinned::{after_lost, AfterLost, PinnedState};

impl Session {
    /// Called when the connections holding the client's state signal a loss;
    /// returns whether the client is kept (else it is closed, as before).
    pub(super) fn pinned_lost(&mut self) -> bool {
        // The hub's connection carrying its redirected tracking: close.
        if self
            .st
            .redirect_lost
            .as_ref()
            .is_some_and(|t| t.is_cancelled())
        {
            return false;
        }
        let Some(p) = &self.st.pinned else {
            return false;
        };
        if !p.lost.is_cancelled() {
            return false;
        }
        let state = PinnedState {
            in_multi: self.st.in_multi,
            watching: self.st.watching,
            selected_db: self.st.db != 0,
            sticky: self.st.sticky,
        };
        let AfterLost::Forget {
            abort_multi,
            fail_watch,
        } = after_lost(state)
        else {
            return false;
        };
        // Its replies owed on that connection have had their errors; the
        // next command that needs a connection of its own gets a new one.
        self.st.pinned = None;
        if abort_multi {
            // What it queued went with the connection: refuse what comes
            // next and answer EXEC with EXECABORT (never half a transaction).
            self.st.in_multi = false;
            self.st.watching = false;
            self.st.tx = Tx {
                doomed: Some("its upstream connection was lost".into()),
                ..Tx::default()
            };
        }
        if fail_watch {
            self.st.watching = false;
            self.st.tx.watch_failed = true;
        }
        debug!(peer = %self.peer, id = self.st.id, abort_multi, fail_watch, "pinned upstream connection lost; client kept");
        true
    }
}
