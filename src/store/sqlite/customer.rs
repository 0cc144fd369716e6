//! The customer's steps on SQLite. Every step is one job of the writer thread (one transaction),
//! so a step and a merchant's cancel or the expiry sweep are serialised; the conditional update
//! in `change_state` is kept anyway, as on PostgreSQL.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::worker::internal;
use super::{change_state, load_session, SqliteStore};
use crate::domain::intent::Flow;
use crate::domain::otp::{self, CodeCheck, OtpState};
use crate::domain::request::SessionType;
use crate::domain::session::{Action, State};
use crate::domain::time::Timestamp;
use crate::store::customer::{
    decide_step, finish_action, CodeEntered, CodeRecorded, CustomerStore, Finish, HostedView, Step, StepDecision,
    StepOutcome,
};
use crate::store::{SessionRecord, StoreError};

fn load_otp(c: &Connection, session_id: Uuid) -> Result<Option<OtpState>, StoreError> {
    c.prepare_cached(
        "SELECT phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on
           FROM one_time_codes WHERE session_id = ?1",
    )
    .and_then(|mut s| {
        s.query_row(params![session_id.as_bytes()], |row| {
            Ok(OtpState {
                phone: row.get(0)?,
                code_hash: row.get(1)?,
                code_expires_on: Timestamp::from_millis(row.get(2)?),
                wrong_attempts: row.get(3)?,
                codes_sent: row.get(4)?,
                last_sent_on: Timestamp::from_millis(row.get(5)?),
            })
        })
        .optional()
    })
    .map_err(|e| internal(&e))
}

fn save_otp(c: &Connection, session_id: Uuid, state: &OtpState) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO one_time_codes
                (session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (session_id) DO UPDATE SET
                phone = excluded.phone, code_hash = excluded.code_hash,
                code_expires_on = excluded.code_expires_on, wrong_attempts = excluded.wrong_attempts,
                codes_sent = excluded.codes_sent, last_sent_on = excluded.last_sent_on",
    )
    .and_then(|mut s| {
        s.execute(params![
            session_id.as_bytes(),
            state.phone,
            state.code_hash,
            state.code_expires_on.millis(),
            state.wrong_attempts,
            state.codes_sent,
            state.last_sent_on.millis()
        ])
    })
    .map(drop)
    .map_err(|e| internal(&e))
}

/// The customer an authenticated session is linked to: the one it names, else the oldest with
/// this phone, else `new_customer`, registered now.
fn link_customer(
    c: &Connection,
    session: &SessionRecord,
    phone: &str,
    new_customer: Uuid,
    now: Timestamp,
) -> Result<Uuid, StoreError> {
    if let Some(known) = session.customer_id {
        return Ok(known);
    }
    let existing: Option<[u8; 16]> = c
        .prepare_cached("SELECT id FROM customers WHERE phone = ?1 ORDER BY created_on, id LIMIT 1")
        .and_then(|mut s| s.query_row(params![phone], |row| row.get(0)).optional())
        .map_err(|e| internal(&e))?;
    if let Some(id) = existing {
        return Ok(Uuid::from_bytes(id));
    }
    let names = session.spec.customer_data.as_ref();
    c.prepare_cached(
        "INSERT INTO customers (id, phone, created_on, first_name, last_name) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            new_customer.as_bytes(),
            phone,
            now.millis(),
            names.and_then(|n| n.first_name.as_deref()),
            names.and_then(|n| n.last_name.as_deref())
        ])
    })
    .map_err(|e| internal(&e))?;
    Ok(new_customer)
}

/// Applies a decided change; `(outcome, deliveries queued)`.
fn apply(
    c: &Connection,
    decision: StepDecision,
    step: &Step,
    prepare: impl FnOnce(&Connection, &mut SessionRecord) -> Result<(), StoreError>,
) -> Result<(StepOutcome, usize), StoreError> {
    match decision {
        StepDecision::Answer(outcome) => Ok((outcome, 0)),
        StepDecision::Change(mut session, to) => {
            prepare(c, &mut session)?;
            match change_state(c, &session, to, step.correlation_id, step.now)? {
                Some(queued) => Ok((StepOutcome::Done(session.changed(to, step.now, step.correlation_id)), queued)),
                // Cannot happen with one writer; answered as the state it found.
                None => Ok((StepOutcome::NotAllowed(session.clone(), session.effective_state(step.now)), 0)),
            }
        }
    }
}

#[async_trait]
impl CustomerStore for SqliteStore {
    async fn hosted_view(&self, session_id: Uuid) -> Result<Option<HostedView>, StoreError> {
        self.point_reads
            .run(move |c| {
                let Some(session) = load_session(c, session_id)? else { return Ok(None) };
                let merchant_name: String = c
                    .prepare_cached("SELECT name FROM merchants WHERE id = ?1")
                    .and_then(|mut s| s.query_row(params![session.merchant_id.as_bytes()], |row| row.get(0)))
                    .map_err(|e| internal(&e))?;
                let customer_phone: Option<String> = match session.customer_id {
                    Some(customer) => c
                        .prepare_cached("SELECT phone FROM customers WHERE id = ?1")
                        .and_then(|mut s| s.query_row(params![customer.as_bytes()], |row| row.get(0)).optional())
                        .map_err(|e| internal(&e))?,
                    None => None,
                };
                let intent_flow = match session.transaction_intent_id {
                    Some(intent) => c
                        .prepare_cached("SELECT flow FROM transaction_intents WHERE id = ?1")
                        .and_then(|mut s| {
                            s.query_row(params![intent.as_bytes()], |row| row.get::<_, String>(0)).optional()
                        })
                        .map_err(|e| internal(&e))?
                        .and_then(|flow| Flow::parse(&flow)),
                    None => None,
                };
                let otp = load_otp(c, session_id)?;
                Ok(Some(HostedView { session, merchant_name, customer_phone, otp, intent_flow }))
            })
            .await
    }

    async fn open_session(&self, step: Step) -> Result<StepOutcome, StoreError> {
        self.writer
            .run(move |c| {
                let decision = decide_step(load_session(c, step.session_id)?, Action::Open, step.now);
                apply(c, decision, &step, |_, _| Ok(())).map(|(outcome, _)| outcome)
            })
            .await
    }

    async fn record_code(&self, step: Step, state: OtpState, seen_codes_sent: u32) -> Result<CodeRecorded, StoreError> {
        self.writer
            .run(move |c| {
                let Some(session) = load_session(c, step.session_id)? else { return Ok(CodeRecorded::NotFound) };
                let current = session.effective_state(step.now);
                if current != State::Opened {
                    return Ok(CodeRecorded::NotAllowed(current));
                }
                if load_otp(c, step.session_id)?.map_or(0, |o| o.codes_sent) != seen_codes_sent {
                    return Ok(CodeRecorded::Raced);
                }
                save_otp(c, step.session_id, &state)?;
                Ok(CodeRecorded::Recorded)
            })
            .await
    }

    async fn enter_code(
        &self,
        step: Step,
        entered_hash: [u8; 32],
        new_customer: Uuid,
    ) -> Result<CodeEntered, StoreError> {
        let (entered, queued) = self
            .writer
            .run(move |c| {
                let Some(session) = load_session(c, step.session_id)? else { return Ok((CodeEntered::NotFound, 0)) };
                let current = session.effective_state(step.now);
                if current != State::Opened {
                    return Ok((CodeEntered::NotAllowed(session, current), 0));
                }
                let Some(mut otp_state) = load_otp(c, step.session_id)? else {
                    return Ok((CodeEntered::Refused(CodeCheck::NoCode), 0));
                };
                match otp::check(Some(&otp_state), &entered_hash, step.now) {
                    CodeCheck::Right => {}
                    CodeCheck::Wrong { tries_left } => {
                        otp_state.wrong_attempts += 1;
                        save_otp(c, step.session_id, &otp_state)?;
                        return Ok((CodeEntered::Refused(CodeCheck::Wrong { tries_left }), 0));
                    }
                    refused => return Ok((CodeEntered::Refused(refused), 0)),
                }
                // A code is good for one sign-in.
                otp_state.code_hash = None;
                save_otp(c, step.session_id, &otp_state)?;
                let phone = otp_state.phone;
                let decision = decide_step(Some(session), Action::Authenticate, step.now);
                let (outcome, mut queued) = apply(c, decision, &step, |c, session| {
                    session.customer_id = Some(link_customer(c, session, &phone, new_customer, step.now)?);
                    Ok(())
                })?;
                let mut outcome = match outcome {
                    StepOutcome::Done(session) => session,
                    StepOutcome::NotAllowed(session, state) => return Ok((CodeEntered::NotAllowed(session, state), 0)),
                    StepOutcome::NotFound => return Ok((CodeEntered::NotFound, 0)),
                };
                // A registration is finished once the customer is known.
                if outcome.spec.kind == SessionType::NewCustomer {
                    let decision = decide_step(Some(outcome.clone()), Action::Complete, step.now);
                    let (completed, more) = apply(c, decision, &step, |_, _| Ok(()))?;
                    queued += more;
                    if let StepOutcome::Done(session) = completed {
                        outcome = session;
                    }
                }
                Ok((CodeEntered::Authenticated(outcome), queued))
            })
            .await?;
        self.queued_deliveries(queued);
        Ok(entered)
    }

    async fn finish(&self, step: Step, finish: Finish) -> Result<StepOutcome, StoreError> {
        let (outcome, queued) = self
            .writer
            .run(move |c| {
                let decision = decide_step(load_session(c, step.session_id)?, finish_action(&finish), step.now);
                apply(c, decision, &step, |c, session| {
                    let Finish::CreateIntent(intent) = &finish else { return Ok(()) };
                    let (Some(customer), Some(data)) = (session.customer_id, session.spec.transaction_data.as_ref())
                    else {
                        return Err(StoreError::Internal("an intent needs a customer and a transaction".into()));
                    };
                    c.prepare_cached(
                        "INSERT INTO transaction_intents
                                (id, merchant_id, session_id, customer_id, flow, amount_cents, currency, created_on)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            intent.id.as_bytes(),
                            session.merchant_id.as_bytes(),
                            session.id.as_bytes(),
                            customer.as_bytes(),
                            intent.flow.as_str(),
                            data.amount.cents() as i64,
                            step.now.millis(),
                            data.currency.code()
                        ])
                    })
                    .map_err(|e| internal(&e))?;
                    session.transaction_intent_id = Some(intent.id);
                    Ok(())
                })
            })
            .await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }
}
