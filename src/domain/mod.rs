//! The domain: session states and transitions, money, locales, time, tokens and request
//! parsing. Plain Rust with no I/O, so that every rule can be unit- and property-tested.

pub mod address;
pub mod event;
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
