//! The rows both backends keep, described once: the columns of a session, a merchant and a
//! kept idempotency record, the live-states condition, the merchant-and-session read, and the
//! one mapping from column values to `SessionRecord`, `Merchant` and `Kept`. A backend says only how it reads a value of each
//! kind from one of its rows (`Columns`: SQLite keeps ids as 16-byte blobs and times as Unix
//! milliseconds, PostgreSQL as `uuid` and `timestamptz`).

use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::domain::idempotency::{Kept, StoredResponse};
use crate::domain::record::{Merchant, SessionRecord};
use crate::domain::session::{State, LIVE_STATES};
use crate::domain::time::Timestamp;
use crate::domain::webhooks::DeliveryState;

/// The columns of a session row, in the order `session_at` reads them.
pub(crate) const SESSION_COLUMNS: &str = "id, merchant_id, state, spec, token, expires_on, created_on, \
     last_modified_on, last_correlation_id, version, customer_id, transaction_intent_id";

/// The columns of a merchant row, in the order `merchant_at` reads them.
pub(crate) const MERCHANT_COLUMNS: &str = "id, name, disabled, created_on";

/// A session is live (it can still change state): `state` is one of `LIVE_STATES`. Written as
/// comparisons rather than an `IN` list, exactly as the condition of SQLite's `sessions_due`
/// index so that the expiry sweep uses it (an `IN` list SQLite would also build as a temporary
/// table for every row it checks); PostgreSQL proves its `IN (…)` index condition from it.
pub(crate) static LIVE: LazyLock<String> = LazyLock::new(|| {
    let states: Vec<String> = LIVE_STATES.iter().map(|state| format!("state = '{}'", state.as_str())).collect();
    format!("({})", states.join(" OR "))
});

/// A delivery still to be sent, or held until its subscription resumes: `Pending` or `Held`.
pub(crate) static OPEN_DELIVERY: LazyLock<String> = LazyLock::new(|| format!("state IN ({})", open_states()));

/// A delivery done with (delivered, failed or cancelled): every other. Written exactly as the
/// condition of the `deliveries_finished` indexes, so that retention reads through them.
pub(crate) static FINISHED_DELIVERY: LazyLock<String> = LazyLock::new(|| format!("state NOT IN ({})", open_states()));

fn open_states() -> String {
    format!("'{}', '{}'", DeliveryState::Pending.as_str(), DeliveryState::Held.as_str())
}

/// `SESSION_COLUMNS` of the table named `alias` (`s.id, s.merchant_id, …`), for joins.
pub(crate) fn session_columns_of(alias: &str) -> String {
    SESSION_COLUMNS.split(", ").map(|column| format!("{alias}.{column}")).collect::<Vec<_>>().join(", ")
}

/// The merchant with the key hash `$1` and the session with the id `$2`, in one statement
/// (the merchant API's most frequent read); `merchant_and_session` maps its row. SQLite
/// numbers its parameters `?1`, `?2`: `numbered` converts.
pub(crate) static MERCHANT_AND_SESSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT m.id, m.name, m.disabled, m.created_on, {}
           FROM merchants m LEFT JOIN sessions s ON s.id = $2
          WHERE m.api_key_hash = $1",
        session_columns_of("s")
    )
});

/// `sql` with its parameters `$n` written `?n`, as SQLite numbers them.
pub(crate) fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// How a backend reads each kind of value the rows hold from one of its rows.
pub(crate) trait Columns {
    type Error;
    fn uuid(&self, index: usize) -> Result<Uuid, Self::Error>;
    fn uuid_opt(&self, index: usize) -> Result<Option<Uuid>, Self::Error>;
    fn text(&self, index: usize) -> Result<String, Self::Error>;
    /// An integer column of any width.
    fn int(&self, index: usize) -> Result<i64, Self::Error>;
    fn flag(&self, index: usize) -> Result<bool, Self::Error>;
    fn time(&self, index: usize) -> Result<Timestamp, Self::Error>;
    fn bytes(&self, index: usize) -> Result<Vec<u8>, Self::Error>;
    /// A JSON document (a session's spec, a kept answer's headers).
    fn json<T: DeserializeOwned>(&self, index: usize) -> Result<T, Self::Error>;
    fn is_null(&self, index: usize) -> Result<bool, Self::Error>;
    /// The error for a value at `index` that no record can hold.
    fn invalid(&self, index: usize, what: String) -> Self::Error;
}

/// The session whose `SESSION_COLUMNS` start at column `at`.
pub(crate) fn session_at<R: Columns>(row: &R, at: usize) -> Result<SessionRecord, R::Error> {
    let state = row.text(at + 2)?;
    Ok(SessionRecord {
        id: row.uuid(at)?,
        merchant_id: row.uuid(at + 1)?,
        state: State::parse(&state).ok_or_else(|| row.invalid(at + 2, format!("unknown session state {state}")))?,
        spec: row.json(at + 3)?,
        token: row.text(at + 4)?,
        expires_on: row.time(at + 5)?,
        created_on: row.time(at + 6)?,
        last_modified_on: row.time(at + 7)?,
        last_correlation_id: row.uuid(at + 8)?,
        version: row.int(at + 9)?,
        customer_id: row.uuid_opt(at + 10)?,
        transaction_intent_id: row.uuid_opt(at + 11)?,
    })
}

/// The session of a row that holds `SESSION_COLUMNS` only.
pub(crate) fn session<R: Columns>(row: &R) -> Result<SessionRecord, R::Error> {
    session_at(row, 0)
}

/// The merchant whose `MERCHANT_COLUMNS` start the row.
pub(crate) fn merchant<R: Columns>(row: &R) -> Result<Merchant, R::Error> {
    Ok(Merchant { id: row.uuid(0)?, name: row.text(1)?, disabled: row.flag(2)?, created_on: row.time(3)? })
}

/// The row of `MERCHANT_AND_SESSION`: the merchant, and the session when there is one.
pub(crate) fn merchant_and_session<R: Columns>(row: &R) -> Result<(Merchant, Option<SessionRecord>), R::Error> {
    let session = if row.is_null(4)? { None } else { Some(session_at(row, 4)?) };
    Ok((merchant(row)?, session))
}

/// The columns `kept_at` reads: the idempotency record `i` and the session `s` its answer
/// refers to (joined with `KEPT_JOIN`).
pub(crate) static KEPT_SELECT: LazyLock<String> =
    LazyLock::new(|| format!("i.fingerprint, i.status, i.headers, i.body, i.session_id, {}", session_columns_of("s")));

/// Joins the session a record `i` refers to, as `s`.
pub(crate) const KEPT_JOIN: &str = "LEFT JOIN sessions s ON s.id = i.session_id";

/// The kept record whose `KEPT_SELECT` columns start at column `at`. Headers that no longer
/// read are answered as none, as a replay without them is still the answer.
pub(crate) fn kept_at<R: Columns>(row: &R, at: usize) -> Result<Kept, R::Error> {
    let answer = if row.is_null(at + 1)? {
        None
    } else {
        let status = row.int(at + 1)?;
        Some(StoredResponse {
            status: u16::try_from(status).map_err(|_| row.invalid(at + 1, format!("stored status {status}")))?,
            headers: if row.is_null(at + 2)? { Vec::new() } else { row.json(at + 2).unwrap_or_default() },
            body: if row.is_null(at + 3)? { Vec::new() } else { row.bytes(at + 3)? },
            session: row.uuid_opt(at + 4)?,
        })
    };
    let session = if row.is_null(at + 5)? { None } else { Some(session_at(row, at + 5)?) };
    Ok(Kept { fingerprint: row.bytes(at)?, answer, session })
}

/// The merchant with the key hash `$1` and its record of the request id `$2`, in one statement;
/// `merchant_and_kept` maps its row.
pub(crate) static MERCHANT_AND_KEPT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT m.id, m.name, m.disabled, m.created_on, {}
           FROM merchants m LEFT JOIN idempotency i ON i.merchant_id = m.id AND i.request_id = $2
                {KEPT_JOIN}
          WHERE m.api_key_hash = $1",
        *KEPT_SELECT
    )
});

/// The row of `MERCHANT_AND_KEPT`: the merchant, and its record when there is one.
pub(crate) fn merchant_and_kept<R: Columns>(row: &R) -> Result<(Merchant, Option<Kept>), R::Error> {
    let kept = if row.is_null(4)? { None } else { Some(kept_at(row, 4)?) };
    Ok((merchant(row)?, kept))
}

/// The record kept under a key: `$1` the merchant, `$2` the request id.
pub(crate) static KEPT_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {} FROM idempotency i {KEPT_JOIN} WHERE i.merchant_id = $1 AND i.request_id = $2", *KEPT_SELECT)
});

/// Keeps a complete idempotency record (over one an earlier version left without an answer)
/// unless one with an answer is kept under its key: `$1` merchant, `$2` request id,
/// `$3` fingerprint, `$4` now, `$5` status, `$6` headers, `$7` body, `$8` session.
pub(crate) const KEEP: &str = "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status,
                                 headers, body, completed_on, session_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $4, $8)
     ON CONFLICT (merchant_id, request_id) DO UPDATE SET
         fingerprint = excluded.fingerprint, started_on = excluded.started_on, status = excluded.status,
         headers = excluded.headers, body = excluded.body, completed_on = excluded.completed_on,
         session_id = excluded.session_id
      WHERE idempotency.status IS NULL";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_condition_names_exactly_the_live_states() {
        let mut named: Vec<_> = LIVE.split('\'').skip(1).step_by(2).collect();
        let mut live: Vec<_> = LIVE_STATES.iter().map(|s| s.as_str()).collect();
        named.sort_unstable();
        live.sort_unstable();
        assert_eq!(named, live);
        assert_eq!(*LIVE, "(state = 'Created' OR state = 'Opened' OR state = 'Authenticated')", "sessions_due");
    }

    #[test]
    fn the_delivery_conditions_are_those_of_the_indexes() {
        assert_eq!(*FINISHED_DELIVERY, "state NOT IN ('Pending', 'Held')", "deliveries_finished");
        assert_eq!(*OPEN_DELIVERY, "state IN ('Pending', 'Held')");
    }

    #[test]
    fn the_merchant_and_session_read_numbers_its_parameters_for_sqlite() {
        let sql = numbered(&MERCHANT_AND_SESSION);
        assert!(sql.contains("s.id = ?2") && sql.contains("api_key_hash = ?1") && !sql.contains('$'), "{sql}");
    }
}
