//! Webhooks: the SSRF-safe outbound client, Standard Webhooks signatures, and the dispatcher
//! that drains the delivery outbox.

pub mod client;
pub mod dispatcher;
pub mod signature;
