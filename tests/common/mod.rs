//! Shared helpers for integration tests: real processes on loopback.
#![allow(dead_code)]

pub mod certs;
pub mod proxy;
pub mod redis;
