//! Shared helpers for integration tests: real processes and servers on
//! loopback ports, started and stopped by each test.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod cluster_load;
pub mod cluster_ops;
pub mod differential;
pub mod failover;
pub mod failover_load;
pub mod front;
pub mod policies;
pub mod proxy;
pub mod redis;
pub mod rotator;
pub mod tls;
pub mod token_emulator;
pub mod twin;
