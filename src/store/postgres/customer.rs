//! The customer's steps on PostgreSQL, for several instances sharing one database at READ
//! COMMITTED. Every step is one short transaction that locks the session row first (as a
//! merchant's cancel does), decides with the same rules as SQLite (`decide_step`), and then
//! writes: the conditional state change, its event, its deliveries and the `NOTIFY`, together.
//! A step, a cancel and the expiry sweep on the same session therefore take turns on its row,
//! and each sees the state the previous one committed.
//!
//! Lock order: the session row, then its `one_time_codes` row, then (registering a customer)
//! the advisory lock of the phone number. No transaction takes them in another order.

use std::sync::LazyLock;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::sessions::{change_state, load_session};
use super::{execute, internal, query_opt, ts, Client, PostgresStore, Result, Ts};
use crate::domain::intent::Flow;
use crate::domain::otp::{self, CodeCheck, OtpState};
use crate::domain::request::SessionType;
use crate::domain::session::{Action, State};
use crate::store::customer::{
    decide_step, finish_action, CodeEntered, CodeRecorded, CustomerStore, Finish, HostedView, Step, StepDecision,
    StepOutcome,
};
use crate::store::rows::{session_at, session_columns_of, SESSION_COLUMNS};
use crate::store::SessionRecord;

/// A count as the `integer` column holds it.
fn int4(n: u32) -> Result<i32> {
    i32::try_from(n).map_err(|_| internal(format!("{n} does not fit an integer column")))
}

/// A count read from an `integer` column.
fn count(row: &tokio_postgres::Row, index: usize) -> Result<u32> {
    let n: i32 = row.try_get(index)?;
    u32::try_from(n).map_err(|_| internal(format!("stored count {n}")))
}

/// A nullable 32-byte `bytea` (the code's keyed hash).
fn hash_opt(row: &tokio_postgres::Row, index: usize) -> Result<Option<[u8; 32]>> {
    row.try_get::<_, Option<&[u8]>>(index)?
        .map(|bytes| bytes.try_into().map_err(|_| internal(format!("column {index} does not hold 32 bytes"))))
        .transpose()
}

const OTP_COLUMNS: &str = "phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on";

/// The sign-in state whose `OTP_COLUMNS` start at column `at`; `None` when they are NULL (no
/// row joined).
fn otp_at(row: &tokio_postgres::Row, at: usize) -> Result<Option<OtpState>> {
    let Some(phone) = row.try_get::<_, Option<String>>(at)? else { return Ok(None) };
    Ok(Some(OtpState {
        phone,
        code_hash: hash_opt(row, at + 1)?,
        code_expires_on: ts(row, at + 2)?,
        wrong_attempts: count(row, at + 3)?,
        codes_sent: count(row, at + 4)?,
        last_sent_on: ts(row, at + 5)?,
    }))
}

/// The session's sign-in state, locked until the transaction ends.
async fn load_otp(tx: &Transaction<'_>, session_id: Uuid) -> Result<Option<OtpState>> {
    let sql = format!("SELECT {OTP_COLUMNS} FROM one_time_codes WHERE session_id = $1 FOR UPDATE");
    match query_opt(tx, &sql, &[&session_id]).await? {
        Some(row) => otp_at(&row, 0),
        None => Ok(None),
    }
}

async fn save_otp(tx: &Transaction<'_>, session_id: Uuid, state: &OtpState) -> Result<()> {
    execute(
        tx,
        "INSERT INTO one_time_codes
                (session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (session_id) DO UPDATE SET
                phone = excluded.phone, code_hash = excluded.code_hash,
                code_expires_on = excluded.code_expires_on, wrong_attempts = excluded.wrong_attempts,
                codes_sent = excluded.codes_sent, last_sent_on = excluded.last_sent_on",
        &[
            &session_id,
            &state.phone,
            &state.code_hash.as_ref().map(|hash| &hash[..]),
            &Ts(state.code_expires_on),
            &int4(state.wrong_attempts)?,
            &int4(state.codes_sent)?,
            &Ts(state.last_sent_on),
        ],
    )
    .await?;
    Ok(())
}

/// The customer an authenticated session is linked to: the one it names, else the oldest with
/// this phone, else `new_customer`, registered now. The phone's advisory lock (held to the end
/// of the transaction) makes two sessions registering the same new phone at once take turns:
/// the second finds the customer the first registered.
async fn link_customer(
    tx: &Transaction<'_>,
    session: &SessionRecord,
    phone: &str,
    new_customer: Uuid,
    now: crate::domain::time::Timestamp,
) -> Result<Uuid> {
    if let Some(known) = session.customer_id {
        return Ok(known);
    }
    execute(tx, "SELECT pg_advisory_xact_lock(hashtext('customer-phone:' || $1::text))", &[&phone]).await?;
    let existing =
        query_opt(tx, "SELECT id FROM customers WHERE phone = $1 ORDER BY created_on, id LIMIT 1", &[&phone]).await?;
    if let Some(row) = existing {
        return Ok(row.try_get(0)?);
    }
    let names = session.spec.customer_data.as_ref();
    execute(
        tx,
        "INSERT INTO customers (id, phone, created_on, first_name, last_name) VALUES ($1, $2, $3, $4, $5)",
        &[
            &new_customer,
            &phone,
            &Ts(now),
            &names.and_then(|n| n.first_name.as_deref()),
            &names.and_then(|n| n.last_name.as_deref()),
        ],
    )
    .await?;
    Ok(new_customer)
}

/// Writes a decided change of `session` (as the caller prepared it) to `to`; `(outcome,
/// deliveries queued)`.
async fn change(tx: &Transaction<'_>, session: SessionRecord, to: State, step: &Step) -> Result<(StepOutcome, usize)> {
    match change_state(tx, &session, to, step.correlation_id, step.now).await? {
        Some(queued) => Ok((StepOutcome::Done(session.changed(to, step.now, step.correlation_id)), queued)),
        // Cannot happen while the row is locked; answered as the state it found, as SQLite does.
        None => {
            let state = session.effective_state(step.now);
            Ok((StepOutcome::NotAllowed(session, state), 0))
        }
    }
}

/// Runs `step` in one transaction and commits it (a refused step commits what it counted).
macro_rules! in_transaction {
    ($c:expr, |$tx:ident| $body:expr) => {{
        let $tx = $c.transaction().await?;
        let result = $body;
        $tx.commit().await?;
        Ok(result)
    }};
}

async fn hosted_view(c: &mut Client, session_id: Uuid) -> Result<Option<HostedView>> {
    // One statement: one round trip and one snapshot.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let otp = OTP_COLUMNS.split(", ").map(|column| format!("o.{column}")).collect::<Vec<_>>();
        format!(
            "SELECT {}, m.name, c.phone, t.flow, {}
               FROM sessions s
               JOIN merchants m ON m.id = s.merchant_id
               LEFT JOIN customers c ON c.id = s.customer_id
               LEFT JOIN transaction_intents t ON t.id = s.transaction_intent_id
               LEFT JOIN one_time_codes o ON o.session_id = s.id
              WHERE s.id = $1",
            session_columns_of("s"),
            otp.join(", ")
        )
    });
    let Some(row) = query_opt(&*c, &SQL, &[&session_id]).await? else { return Ok(None) };
    let columns = SESSION_COLUMNS.split(", ").count();
    Ok(Some(HostedView {
        session: session_at(&row, 0)?,
        merchant_name: row.try_get(columns)?,
        customer_phone: row.try_get(columns + 1)?,
        intent_flow: row.try_get::<_, Option<&str>>(columns + 2)?.and_then(Flow::parse),
        otp: otp_at(&row, columns + 3)?,
    }))
}

async fn open_session(c: &mut Client, step: Step) -> Result<(StepOutcome, usize)> {
    in_transaction!(c, |tx| {
        let decision = decide_step(load_session(&tx, step.session_id, true).await?, Action::Open, step.now);
        match decision {
            StepDecision::Answer(outcome) => (outcome, 0),
            StepDecision::Change(session, to) => change(&tx, session, to, &step).await?,
        }
    })
}

async fn record_code(c: &mut Client, step: Step, state: OtpState, seen_codes_sent: u32) -> Result<CodeRecorded> {
    in_transaction!(c, |tx| 'step: {
        let Some(session) = load_session(&tx, step.session_id, true).await? else {
            break 'step CodeRecorded::NotFound;
        };
        let current = session.effective_state(step.now);
        if current != State::Opened {
            break 'step CodeRecorded::NotAllowed(current);
        }
        if load_otp(&tx, step.session_id).await?.map_or(0, |o| o.codes_sent) != seen_codes_sent {
            break 'step CodeRecorded::Raced;
        }
        save_otp(&tx, step.session_id, &state).await?;
        CodeRecorded::Recorded
    })
}

async fn enter_code(
    c: &mut Client,
    step: Step,
    entered_hash: [u8; 32],
    new_customer: Uuid,
) -> Result<(CodeEntered, usize)> {
    in_transaction!(c, |tx| 'step: {
        let Some(session) = load_session(&tx, step.session_id, true).await? else {
            break 'step (CodeEntered::NotFound, 0);
        };
        let current = session.effective_state(step.now);
        if current != State::Opened {
            break 'step (CodeEntered::NotAllowed(session, current), 0);
        }
        let Some(mut otp_state) = load_otp(&tx, step.session_id).await? else {
            break 'step (CodeEntered::Refused(CodeCheck::NoCode), 0);
        };
        match otp::check(Some(&otp_state), &entered_hash, step.now) {
            CodeCheck::Right => {}
            CodeCheck::Wrong { tries_left } => {
                otp_state.wrong_attempts += 1;
                save_otp(&tx, step.session_id, &otp_state).await?;
                break 'step (CodeEntered::Refused(CodeCheck::Wrong { tries_left }), 0);
            }
            refused => break 'step (CodeEntered::Refused(refused), 0),
        }
        // A code is good for one sign-in.
        otp_state.code_hash = None;
        save_otp(&tx, step.session_id, &otp_state).await?;
        let (mut outcome, mut queued) = match decide_step(Some(session), Action::Authenticate, step.now) {
            StepDecision::Answer(answer) => (answer, 0),
            StepDecision::Change(mut session, to) => {
                session.customer_id =
                    Some(link_customer(&tx, &session, &otp_state.phone, new_customer, step.now).await?);
                change(&tx, session, to, &step).await?
            }
        };
        // A registration is finished once the customer is known.
        if let StepOutcome::Done(session) = &outcome {
            if session.spec.kind == SessionType::NewCustomer {
                if let StepDecision::Change(session, to) =
                    decide_step(Some(session.clone()), Action::Complete, step.now)
                {
                    let (completed, more) = change(&tx, session, to, &step).await?;
                    queued += more;
                    if let StepOutcome::Done(_) = completed {
                        outcome = completed;
                    }
                }
            }
        }
        match outcome {
            StepOutcome::Done(session) => (CodeEntered::Authenticated(session), queued),
            StepOutcome::NotAllowed(session, state) => (CodeEntered::NotAllowed(session, state), 0),
            StepOutcome::NotFound => (CodeEntered::NotFound, 0),
        }
    })
}

async fn finish_session(c: &mut Client, step: Step, finish: Finish) -> Result<(StepOutcome, usize)> {
    in_transaction!(c, |tx| {
        let session = load_session(&tx, step.session_id, true).await?;
        match decide_step(session, finish_action(&finish), step.now) {
            StepDecision::Answer(outcome) => (outcome, 0),
            StepDecision::Change(mut session, to) => {
                if let Finish::CreateIntent(intent) = &finish {
                    let (Some(customer), Some(data)) = (session.customer_id, session.spec.transaction_data.as_ref())
                    else {
                        return Err(internal("an intent needs a customer and a transaction"));
                    };
                    let currency = data.currency.code();
                    execute(
                        &tx,
                        "INSERT INTO transaction_intents
                                (id, merchant_id, session_id, customer_id, flow, amount, currency, created_on)
                         VALUES ($1, $2, $3, $4, $5, $6::text::numeric(12,2), $7, $8)",
                        &[
                            &intent.id,
                            &session.merchant_id,
                            &session.id,
                            &customer,
                            &intent.flow.as_str(),
                            &data.amount.to_string(),
                            &currency,
                            &Ts(step.now),
                        ],
                    )
                    .await?;
                    session.transaction_intent_id = Some(intent.id);
                }
                change(&tx, session, to, &step).await?
            }
        }
    })
}

#[async_trait]
impl CustomerStore for PostgresStore {
    async fn hosted_view(&self, session_id: Uuid) -> Result<Option<HostedView>> {
        self.run(move |c| Box::pin(hosted_view(c, session_id))).await
    }

    async fn open_session(&self, step: Step) -> Result<StepOutcome> {
        let (outcome, queued) = self.run(move |c| Box::pin(open_session(c, step))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn record_code(&self, step: Step, state: OtpState, seen_codes_sent: u32) -> Result<CodeRecorded> {
        self.run(move |c| Box::pin(record_code(c, step, state, seen_codes_sent))).await
    }

    async fn enter_code(&self, step: Step, entered_hash: [u8; 32], new_customer: Uuid) -> Result<CodeEntered> {
        let (entered, queued) = self.run(move |c| Box::pin(enter_code(c, step, entered_hash, new_customer))).await?;
        self.queued_deliveries(queued);
        Ok(entered)
    }

    async fn finish(&self, step: Step, finish: Finish) -> Result<StepOutcome> {
        let (outcome, queued) = self.run(move |c| Box::pin(finish_session(c, step, finish))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }
}
