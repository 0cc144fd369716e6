//! The redirect-session state machine: states, actions and the one function that decides
//! every transition. No I/O; expiry is a function of the clock (`effective_state`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::time::Timestamp;

/// Where a redirect session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum State {
    Created,
    Opened,
    Authenticated,
    Completed,
    Aborted,
    Cancelled,
    Expired,
}

/// Everything that can happen to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The customer's browser presented a valid token on the hosted page.
    Open,
    /// The customer proved who they are.
    Authenticate,
    /// The flow finished.
    Complete,
    /// The customer gave up.
    Abort,
    /// The merchant cancelled.
    Cancel,
    /// `expiresOn` passed.
    Expire,
}

/// What a transition does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The session moves to this state (and an event may be due).
    To(State),
    /// Nothing to do: the action already happened (cancel of a cancelled session).
    Unchanged,
}

/// The action is not allowed from the session's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidTransition {
    pub from: State,
    pub action: Action,
}

/// All states, in the order of the table in docs/DESIGN.md.
pub const ALL_STATES: [State; 7] = [
    State::Created,
    State::Opened,
    State::Authenticated,
    State::Completed,
    State::Aborted,
    State::Cancelled,
    State::Expired,
];

/// States from which the merchant may cancel and the clock may expire.
pub const LIVE_STATES: [State; 3] = [State::Created, State::Opened, State::Authenticated];

impl State {
    /// `Completed`, `Aborted`, `Cancelled` and `Expired`: nothing leaves them.
    pub fn is_terminal(self) -> bool {
        !LIVE_STATES.contains(&self)
    }

    /// The name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Opened => "Opened",
            State::Authenticated => "Authenticated",
            State::Completed => "Completed",
            State::Aborted => "Aborted",
            State::Cancelled => "Cancelled",
            State::Expired => "Expired",
        }
    }

    /// The state named `text`, exactly as `as_str` writes it.
    pub fn parse(text: &str) -> Option<State> {
        ALL_STATES.into_iter().find(|s| s.as_str() == text)
    }
}

/// The state every reader and writer must use: a live session whose `expires_on` has
/// passed is `Expired` from that instant, whether or not the sweep has written it down.
pub fn effective_state(stored: State, expires_on: Timestamp, now: Timestamp) -> State {
    if !stored.is_terminal() && now >= expires_on {
        State::Expired
    } else {
        stored
    }
}

/// Decides `action` on a session in `from` (already the effective state).
pub fn transition(from: State, action: Action) -> Result<Transition, InvalidTransition> {
    use Action::*;
    use State::*;
    let to = match (from, action) {
        (Created, Open) => Opened,
        (Opened, Authenticate) => Authenticated,
        (Authenticated, Complete) => Completed,
        (Opened | Authenticated, Abort) => Aborted,
        (Created | Opened | Authenticated, Cancel) => Cancelled,
        (Created | Opened | Authenticated, Expire) => Expired,
        (Cancelled, Cancel) | (Expired, Expire) => return Ok(Transition::Unchanged),
        _ => return Err(InvalidTransition { from, action }),
    };
    Ok(Transition::To(to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_ACTIONS: [Action; 6] =
        [Action::Open, Action::Authenticate, Action::Complete, Action::Abort, Action::Cancel, Action::Expire];

    #[test]
    fn the_allowed_transitions_are_exactly_these() {
        use Action::*;
        use State::*;
        let allowed = [
            (Created, Open, Opened),
            (Opened, Authenticate, Authenticated),
            (Authenticated, Complete, Completed),
            (Opened, Abort, Aborted),
            (Authenticated, Abort, Aborted),
            (Created, Cancel, Cancelled),
            (Opened, Cancel, Cancelled),
            (Authenticated, Cancel, Cancelled),
            (Created, Expire, Expired),
            (Opened, Expire, Expired),
            (Authenticated, Expire, Expired),
        ];
        let unchanged = [(Cancelled, Cancel), (Expired, Expire)];
        for from in ALL_STATES {
            for action in ALL_ACTIONS {
                let expected = if let Some((_, _, to)) = allowed.iter().find(|(f, a, _)| *f == from && *a == action) {
                    Ok(Transition::To(*to))
                } else if unchanged.contains(&(from, action)) {
                    Ok(Transition::Unchanged)
                } else {
                    Err(InvalidTransition { from, action })
                };
                assert_eq!(transition(from, action), expected, "{from:?} + {action:?}");
            }
        }
    }

    #[test]
    fn cancel_of_a_completed_aborted_or_expired_session_is_invalid() {
        for from in [State::Completed, State::Aborted, State::Expired] {
            assert!(transition(from, Action::Cancel).is_err());
        }
    }

    #[test]
    fn a_live_session_is_expired_from_the_instant_expires_on_passes() {
        let expires = Timestamp::from_millis(1_000);
        assert_eq!(effective_state(State::Created, expires, Timestamp::from_millis(999)), State::Created);
        assert_eq!(effective_state(State::Created, expires, Timestamp::from_millis(1_000)), State::Expired);
        assert_eq!(effective_state(State::Authenticated, expires, Timestamp::from_millis(5_000)), State::Expired);
        assert_eq!(effective_state(State::Cancelled, expires, Timestamp::from_millis(5_000)), State::Cancelled);
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in ALL_STATES {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
        assert_eq!(State::parse("created"), None);
    }

    fn any_state() -> impl Strategy<Value = State> {
        proptest::sample::select(ALL_STATES.to_vec())
    }

    fn any_action() -> impl Strategy<Value = Action> {
        proptest::sample::select(ALL_ACTIONS.to_vec())
    }

    proptest! {
        #[test]
        fn nothing_leaves_a_terminal_state(from in any_state(), action in any_action()) {
            if from.is_terminal() {
                prop_assert!(!matches!(transition(from, action), Ok(Transition::To(_))));
            }
        }

        #[test]
        fn any_sequence_of_actions_ends_in_at_most_one_terminal_state(
            actions in proptest::collection::vec(any_action(), 0..20)
        ) {
            let mut state = State::Created;
            let mut terminal_reached: Option<State> = None;
            for action in actions {
                if let Ok(Transition::To(next)) = transition(state, action) {
                    prop_assert!(!state.is_terminal(), "left terminal {:?}", state);
                    state = next;
                }
                if state.is_terminal() {
                    if let Some(first) = terminal_reached {
                        prop_assert_eq!(first, state);
                    }
                    terminal_reached = Some(state);
                }
            }
        }

        #[test]
        fn expiry_never_changes_a_terminal_state(from in any_state(), now in 0i64..10_000) {
            let effective = effective_state(from, Timestamp::from_millis(5_000), Timestamp::from_millis(now));
            if from.is_terminal() {
                prop_assert_eq!(effective, from);
            } else {
                prop_assert!(effective == from || effective == State::Expired);
            }
        }
    }
}
