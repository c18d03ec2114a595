//! session-sweeper: finds abandoned "Pay with iyzico" checkout sessions in the application's
//! database and invalidates them through iyzico, safely, observably and exactly once.
//!
//! Data flows one way: `daemon` (schedule) → `sweep` (claim → invalidate → record), with
//! `store` and `iyzico` as the two edges. `config`, `shutdown` and `telemetry` are shared leaves.

pub mod build_info;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fleet;
pub mod iyzico;
pub mod release;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod sweep;
pub mod telemetry;
