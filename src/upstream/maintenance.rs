//! What the proxy does when the server side changes under its clients: a
//! connection lost, a failover, a maintenance notice. Pure decisions over
//! values (no sockets, no clock of its own: time comes in as an argument);
//! the connection supervisor ([`super::conn`]) is the thin driver.
//!
//! - [`hold`]: commands not yet sent wait, bounded in count, bytes and
//!   `upstream.hold`, while a shared connection is re-established.
//! - [`retry`]: which commands in flight on a lost connection may be sent
//!   again (those that cannot have changed anything).
//! - [`notices`]: Azure Cache for Redis's `AzureRedisEvents` notices read,
//!   and what each one makes the proxy do.
//! - [`pinned`]: dedicated connections through a drop: what the client's
//!   session does, when a blocked command waits again, how long to dial.
//! - [`resubscribe`]: the hub's subscriptions are made again before held
//!   commands (its `PUBLISH`es) go out after a drop.
//! - [`moving`]: where new connections go after a `MOVING` push.
//! - [`pushes`]: Redis Enterprise's RESP3 maintenance pushes (`MOVING`,
//!   `MIGRATING`, `FAILING_OVER`, ...) read, deduplicated, and their actions.

pub mod hold;
pub mod moving;
pub mod notices;
pub mod pinned;
pub mod pushes;
pub mod resubscribe;
pub mod retry;

pub use hold::{
    expired_error, full_error, hold_through, Dropped, HoldQueue, HOLD_MAX_BYTES, HOLD_MAX_COMMANDS,
    HOLD_RETRY,
};
