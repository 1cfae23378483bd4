//! The command model, one home for what a command is: how it routes
//! ([`Class`]), whether the server would refuse it before running it
//! (unknown, wrong arity: [`Refusal`]), where its keys are and which slot
//! they hash to ([`keys`]), its flags ([`Flags`]: readonly, write,
//! blocking, pubsub, noscript...), and how it spreads over a cluster's
//! primaries ([`Fan`], [`Merge`]). [`Commands`] holds it all, built once per
//! upstream from the server's `COMMAND` reply merged with the proxy's own
//! tables; the routers ([`crate::route`], [`crate::upstream::cluster::route`])
//! and the session read it and only decide.
//!
//! - `table`: the proxy's own facts by name (class, refusals,
//!   subscribed-mode commands) and [`classify`].
//! - `arity`: the proxy's own commands' arities, the rule.
//! - [`keys`]: key positions, CRC16 hash slots.
//! - `cluster`: split and fan-out kinds.
//! - `model`: [`Commands`], the merge, and its answers;
//!   [`Commands::face`] judges what the proxy answers as itself (the cluster
//!   face) as a Redis 7.0 cluster node does, and [`Commands::refusal_text`]
//!   words a refusal as Redis does.

mod arity;
mod cluster;
pub mod keys;
mod model;
mod table;

pub use arity::Refusal;
pub use cluster::{Fan, Merge};
pub use model::{Commands, Flags};
pub use table::{
    classify, listed, refusal, xread_block_pos, Class, Local, Pin, PubSub, CLIENT_TABLE,
    SUBSCRIBED_MODE, TABLE,
};
