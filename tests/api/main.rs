//! The integration suite: one test binary (one build and one link for all of it), one module
//! per area of the product, and one harness (`common`: a server in this process or the real
//! binary as a child, a fresh database of the backend under test; `webhook_support`: a real
//! webhook receiver on a loopback port). README "Test it" says how to run it on each backend.

mod common;
mod webhook_support;

mod docs;
mod hosted;
mod idempotency;
mod instances;
mod log_secrets;
mod migrate_data;
mod outage;
mod process;
mod secrets;
mod session_rules;
mod sessions;
mod slow_clients;
mod smoke;
mod subscription_operations;
mod subscriptions;
mod tokens;
mod webhooks;
