//! redirect-sessions: create, read, list and cancel redirect sessions for payment merchants,
//! with an event outbox for webhooks. `main.rs` is the CLI; everything else lives here.

pub mod admin;
pub mod api;
pub mod app;
pub mod code_sender;
pub mod config;
pub mod domain;
pub mod error;
pub mod hosted;
pub mod metrics;
pub mod migrate_data;
pub mod rate_limit;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod webhooks;
