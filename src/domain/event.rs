//! Events about redirect sessions: what the outbox records and webhooks later carry.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::session::State;

/// The kinds of event a merchant can subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    RedirectSessionCancelled,
    RedirectSessionExpired,
    RedirectSessionCompleted,
    RedirectSessionAborted,
}

impl EventType {
    /// The event a move into `state` causes, if any.
    pub fn for_state(state: State) -> Option<EventType> {
        match state {
            State::Cancelled => Some(EventType::RedirectSessionCancelled),
            State::Expired => Some(EventType::RedirectSessionExpired),
            State::Completed => Some(EventType::RedirectSessionCompleted),
            State::Aborted => Some(EventType::RedirectSessionAborted),
            State::Created | State::Opened | State::Authenticated => None,
        }
    }

    /// The name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RedirectSessionCancelled => "RedirectSessionCancelled",
            EventType::RedirectSessionExpired => "RedirectSessionExpired",
            EventType::RedirectSessionCompleted => "RedirectSessionCompleted",
            EventType::RedirectSessionAborted => "RedirectSessionAborted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::session::ALL_STATES;

    #[test]
    fn exactly_the_terminal_states_cause_an_event() {
        for state in ALL_STATES {
            assert_eq!(EventType::for_state(state).is_some(), state.is_terminal(), "{state:?}");
        }
    }
}
