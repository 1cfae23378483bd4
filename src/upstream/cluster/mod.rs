//! Clustered caches (Azure Managed Redis OSS cluster policy, clustered Azure
//! Cache for Redis): the proxy presents one plain Redis to its clients and
//! sends each command to the primary that owns its keys.
//!
//! - [`route`]: pure placement of one command (slot, any node, split, fan-out,
//!   refusal).
//! - [`merge`]: pure merging of the parts' replies.

pub mod merge;
pub mod route;
