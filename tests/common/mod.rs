//! Shared helpers for integration tests: servers on loopback ports, started and
//! stopped by each test.
#![allow(dead_code)]

pub mod tls;
pub mod token_emulator;
