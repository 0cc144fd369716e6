//! The domain: session states and transitions, the records both backends store and the
//! decisions on them, money, locales, time, tokens and request parsing. Plain Rust with no I/O
//! and nothing from `api`, `store` or `webhooks`, so that every rule can be unit- and
//! property-tested.

pub mod address;
pub mod customer;
pub mod event;
pub mod idempotency;
pub mod intent;
pub mod key;
pub mod locale;
pub mod money;
pub mod otp;
pub mod record;
pub mod request;
pub mod session;
pub mod subscription;
pub mod time;
pub mod token;
pub mod validate;
pub mod webhooks;
