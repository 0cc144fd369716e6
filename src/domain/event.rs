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

    /// The type named `text` (`as_str`).
    pub fn parse(text: &str) -> Option<Self> {
        crate::domain::subscription::ALL_EVENT_TYPES.into_iter().find(|t| t.as_str() == text)
    }
}

/// What a delivery carries: an event of one of the types above, or a test event a merchant
/// asked for (`POST …/subscriptions/{id}/test`), which belongs to no session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, ToSchema)]
pub enum EventKind {
    RedirectSessionCancelled,
    RedirectSessionExpired,
    RedirectSessionCompleted,
    RedirectSessionAborted,
    RedirectSessionTest,
}

impl EventKind {
    const ALL: [EventKind; 5] = [
        EventKind::RedirectSessionCancelled,
        EventKind::RedirectSessionExpired,
        EventKind::RedirectSessionCompleted,
        EventKind::RedirectSessionAborted,
        EventKind::RedirectSessionTest,
    ];

    /// The name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RedirectSessionCancelled => EventType::RedirectSessionCancelled.as_str(),
            EventKind::RedirectSessionExpired => EventType::RedirectSessionExpired.as_str(),
            EventKind::RedirectSessionCompleted => EventType::RedirectSessionCompleted.as_str(),
            EventKind::RedirectSessionAborted => EventType::RedirectSessionAborted.as_str(),
            EventKind::RedirectSessionTest => "RedirectSessionTest",
        }
    }

    /// The kind named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

impl From<EventType> for EventKind {
    fn from(event: EventType) -> Self {
        match event {
            EventType::RedirectSessionCancelled => EventKind::RedirectSessionCancelled,
            EventType::RedirectSessionExpired => EventKind::RedirectSessionExpired,
            EventType::RedirectSessionCompleted => EventKind::RedirectSessionCompleted,
            EventType::RedirectSessionAborted => EventKind::RedirectSessionAborted,
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

    #[test]
    fn every_event_kind_reads_back_from_its_name() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        for event in crate::domain::subscription::ALL_EVENT_TYPES {
            assert_eq!(EventKind::from(event).as_str(), event.as_str());
        }
    }
}
