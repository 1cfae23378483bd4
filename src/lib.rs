//! redis-entra-proxy: plain RESP on localhost in, TLS with Entra ID AUTH out.
//!
//! A command travels: `downstream::listener` accepts the client ->
//! `downstream::session` frames it with `resp::scan` and classifies it with
//! `command` -> local reply, or `upstream::pool` picks a shared (multiplexed) or
//! pinned `upstream::conn` -> `upstream::tls` to Azure and back, FIFO. `auth`
//! publishes the credential every upstream connection AUTHs with.

pub mod acceptance;
pub mod admin;
pub mod auth;
pub mod check;
pub mod command;
pub mod config;
pub mod downstream;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod resp;
pub mod route;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod systemd;
pub mod upstream;
pub mod write_queue;
