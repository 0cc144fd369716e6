//! The customer's side of a session (the hosted page, docs/HOSTED.md): the steps that move a
//! session on — arrive, send a code, enter it, finish, give up. Each step is one transaction
//! with a conditional state change, like the merchant's cancel, so a step racing a cancel or
//! the clock has exactly one winner. What the steps speak in and decide is the domain's
//! (`crate::domain::customer`).

use async_trait::async_trait;
use uuid::Uuid;

use super::StoreError;
pub use crate::domain::customer::{
    decide_step, finish_action, CodeEntered, CodeRecorded, Finish, HostedView, Step, StepDecision, StepOutcome,
};
use crate::domain::otp::OtpState;

/// The customer-side use cases.
#[async_trait]
pub trait CustomerStore: Send + Sync + 'static {
    /// The page's view of a session; `None` for an unknown id.
    async fn hosted_view(&self, session_id: Uuid) -> Result<Option<HostedView>, StoreError>;

    /// `Created` → `Opened`; an `Opened` or `Authenticated` session is answered as it is.
    async fn open_session(&self, step: Step) -> Result<StepOutcome, StoreError>;

    /// Records a code that was just sent, if the session is still `Opened` and the sign-in state
    /// is still the one the caller decided on (`seen_codes_sent`).
    async fn record_code(&self, step: Step, state: OtpState, seen_codes_sent: u32) -> Result<CodeRecorded, StoreError>;

    /// Checks an entered code (by its keyed hash). Right: links the customer — the session's,
    /// else the oldest with the code's phone, else `new_customer` registered with that phone
    /// and the names of `customerData` — and moves `Opened` → `Authenticated`; a registration
    /// (`NewCustomer`) goes on to `Completed` and records its event. Wrong: counts the entry.
    async fn enter_code(
        &self,
        step: Step,
        entered_hash: [u8; 32],
        new_customer: Uuid,
    ) -> Result<CodeEntered, StoreError>;

    /// Completes (`Authenticated` → `Completed`, with the intent when there is one) or gives up
    /// (`Opened`/`Authenticated` → `Aborted`), recording the event in the same transaction.
    async fn finish(&self, step: Step, finish: Finish) -> Result<StepOutcome, StoreError>;
}
