//! What the seed pool hands over to the cluster layer, named by a trait so
//! that the pool and the cluster do not depend on each other.

use crate::resp::Proto;
use crate::upstream::conn::{Handle, PushSink};
use crate::upstream::topology::{Node, SlotMap};
use crate::upstream::UpstreamError;
use std::sync::Arc;

use super::Pinned;

/// A client's dispatcher, run by polling it (from the client's session):
/// ends once the client let go of its [`Handle`] and every batch it sent was
/// answered.
pub type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A boxed future, for the async methods of [`ClusterLayer`].
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What the seed pool hands its shared and pinned connections over to when
/// the upstream may be a cluster ([`super::Pool::install_cluster`]). Implemented by
/// the cluster layer, which uses this module: the pool names only this trait,
/// so the two do not depend on each other.
pub trait ClusterLayer: Send + Sync {
    /// A client's shared connection while the upstream is (or may be) a
    /// cluster: a dispatcher of its own and the future that runs it; `None`:
    /// the seed pool's own connection.
    fn shared(self: Arc<Self>, proto: Proto) -> Option<(Handle, Driver)>;
    /// A shared connection of one node's own pool.
    fn node_shared(&self, node: &Node, proto: Proto) -> Handle;
    /// Whether requests go through the cluster layer now.
    fn active(&self) -> bool;
    /// The current slot map (`None` before the first one is read).
    fn map(&self) -> Option<Arc<SlotMap>>;
    /// Whether the upstream is a cluster, waiting for the answer while that
    /// is not known yet.
    fn is_cluster(&self) -> BoxFuture<'_, Result<bool, UpstreamError>>;
    /// A client's dedicated connection through the cluster layer.
    fn pin(
        self: Arc<Self>,
        proto: Proto,
        push: PushSink,
    ) -> BoxFuture<'static, Result<Pinned, UpstreamError>>;
}
