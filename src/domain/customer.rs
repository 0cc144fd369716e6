//! The customer's side of a session (docs/HOSTED.md): what the hosted page reads, the steps
//! that move a session on, what each comes to, and the decision both backends make with the
//! state machine.

use uuid::Uuid;

use super::intent::{Flow, Intent};
use super::otp::OtpState;
use super::record::SessionRecord;
use super::session::{transition, Action, State, Transition};
use super::time::Timestamp;

/// Everything the hosted page shows for a session, read at one point in time.
#[derive(Clone, Debug)]
pub struct HostedView {
    pub session: SessionRecord,
    pub merchant_name: String,
    /// The phone of the customer the session names, if it names one.
    pub customer_phone: Option<String>,
    /// The sign-in state, once a code was sent.
    pub otp: Option<OtpState>,
    /// The flow of the intent the session names or created, when this service knows it.
    pub intent_flow: Option<Flow>,
}

/// A step the customer takes on a live session.
#[derive(Clone, Debug)]
pub struct Step {
    pub session_id: Uuid,
    /// Correlates the state change (`lastCorrelationId`) with the page request that made it.
    pub correlation_id: Uuid,
    pub now: Timestamp,
}

/// What a step came to.
#[derive(Debug)]
pub enum StepOutcome {
    /// The step happened (or had already happened, for arrivals); the session as it is now.
    Done(SessionRecord),
    /// The session's state does not allow the step; nothing changed. The state is the effective
    /// one (`Expired` for a session whose time has passed).
    NotAllowed(SessionRecord, State),
    NotFound,
}

/// What recording a sent code came to.
#[derive(Debug, PartialEq, Eq)]
pub enum CodeRecorded {
    Recorded,
    /// Another code was recorded since the caller read the state (two tabs); nothing changed.
    Raced,
    /// The session is no longer `Opened`; nothing changed.
    NotAllowed(State),
    NotFound,
}

/// What entering a code came to.
#[derive(Debug)]
pub enum CodeEntered {
    /// Right: the session is `Authenticated` (or `Completed`, for a registration) and linked
    /// to this customer.
    Authenticated(SessionRecord),
    /// Wrong, expired or used up: the entry was counted; the page explains from the state.
    Refused(crate::domain::otp::CodeCheck),
    /// The session is no longer `Opened`; nothing changed.
    NotAllowed(SessionRecord, State),
    NotFound,
}

/// How the session ends when the customer finishes.
#[derive(Clone, Debug)]
pub enum Finish {
    /// `NewTransactionIntent`: create this intent and complete.
    CreateIntent(Intent),
    /// `ExistingTransactionIntent`: the customer has seen the code; complete.
    Acknowledge,
    /// The customer gave up: `Aborted`.
    GiveUp,
}

/// What a customer step does to the session it names, decided with the domain's state
/// machine from the row as read (under whatever lock the backend holds). Both backends use
/// it, so they cannot disagree.
#[derive(Debug)]
pub enum StepDecision {
    /// Answer this without writing.
    Answer(StepOutcome),
    /// Move the session to this state.
    Change(SessionRecord, State),
}

/// Decides `action` (a customer's: open, authenticate, complete, abort) on `session`.
pub fn decide_step(session: Option<SessionRecord>, action: Action, now: Timestamp) -> StepDecision {
    let Some(session) = session else {
        return StepDecision::Answer(StepOutcome::NotFound);
    };
    let from = session.effective_state(now);
    match transition(from, action) {
        Ok(Transition::To(to)) => StepDecision::Change(session, to),
        // Arriving again keeps the session where the customer left it.
        Err(_) if action == Action::Open && matches!(from, State::Opened | State::Authenticated) => {
            StepDecision::Answer(StepOutcome::Done(session))
        }
        Ok(Transition::Unchanged) | Err(_) => StepDecision::Answer(StepOutcome::NotAllowed(session, from)),
    }
}

/// The action a finish takes.
pub fn finish_action(finish: &Finish) -> Action {
    match finish {
        Finish::CreateIntent(_) | Finish::Acknowledge => Action::Complete,
        Finish::GiveUp => Action::Abort,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::{RedirectData, SessionSpec, SessionType};

    fn session(state: State) -> SessionRecord {
        SessionRecord {
            id: Uuid::nil(),
            merchant_id: Uuid::max(),
            spec: SessionSpec {
                kind: SessionType::NewCustomer,
                customer_id: None,
                customer_data: None,
                transaction_data: None,
                transaction_intent_id: None,
                redirect_data: RedirectData {
                    success_url: "https://shop.example/ok".into(),
                    failure_url: "https://shop.example/failed".into(),
                    abort_url: "https://shop.example/aborted".into(),
                    qr_code_success_url: "https://shop.example/qr".into(),
                },
                locale: "de-DE".into(),
            },
            state,
            token: String::new(),
            expires_on: Timestamp::from_millis(10_000),
            created_on: Timestamp::from_millis(0),
            last_modified_on: Timestamp::from_millis(0),
            last_correlation_id: Uuid::nil(),
            version: 1,
            customer_id: None,
            transaction_intent_id: None,
        }
    }

    fn decided(state: State, action: Action, now: i64) -> String {
        match decide_step(Some(session(state)), action, Timestamp::from_millis(now)) {
            StepDecision::Change(_, to) => format!("change to {to:?}"),
            StepDecision::Answer(StepOutcome::Done(s)) => format!("done in {:?}", s.state),
            StepDecision::Answer(StepOutcome::NotAllowed(_, from)) => format!("not allowed from {from:?}"),
            StepDecision::Answer(StepOutcome::NotFound) => "not found".into(),
        }
    }

    #[test]
    fn arriving_opens_a_created_session_once() {
        assert_eq!(decided(State::Created, Action::Open, 1), "change to Opened");
        assert_eq!(decided(State::Opened, Action::Open, 1), "done in Opened");
        assert_eq!(decided(State::Authenticated, Action::Open, 1), "done in Authenticated");
    }

    #[test]
    fn no_customer_step_moves_a_cancelled_or_expired_session() {
        for action in [Action::Open, Action::Authenticate, Action::Complete, Action::Abort] {
            assert_eq!(decided(State::Cancelled, action, 1), "not allowed from Cancelled", "{action:?}");
            // Stored as live, but its time has passed: expired for every writer.
            assert_eq!(decided(State::Authenticated, action, 10_000), "not allowed from Expired", "{action:?}");
        }
    }

    #[test]
    fn finishing_needs_authentication_and_giving_up_needs_an_arrival() {
        assert_eq!(decided(State::Opened, Action::Complete, 1), "not allowed from Opened");
        assert_eq!(decided(State::Authenticated, Action::Complete, 1), "change to Completed");
        assert_eq!(decided(State::Opened, Action::Abort, 1), "change to Aborted");
        assert_eq!(decided(State::Created, Action::Abort, 1), "not allowed from Created");
        assert!(matches!(
            decide_step(None, Action::Open, Timestamp::from_millis(1)),
            StepDecision::Answer(StepOutcome::NotFound)
        ));
    }
}
