//! session-sweeper: finds abandoned "Pay with iyzico" checkout sessions in the application's
//! database and invalidates them through iyzico, safely, observably and exactly once.
//!
//! Data flows one way: the commands (`cli`, `daemon`, `demo`) → `engine` (the wiring) → `sweep`
//! (claim → invalidate → record), with `store` and `iyzico` as the two edges. `telemetry`,
//! `config` and `shutdown` are shared leaves. No module imports one above it: the README's
//! Development section draws the layers, and `tests/layout.rs` checks them.

pub mod build_info;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod fleet;
pub mod iyzico;
pub mod output;
pub mod release;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod sweep;
pub mod telemetry;
