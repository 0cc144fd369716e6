//! The tables `migrate-data` copies: how each is read from SQLite and copied into PostgreSQL,
//! and the conversions of SQLite column values into the target's.

use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use super::values::{Jsonb, Numeric};
use crate::domain::request::SessionSpec;
use crate::domain::time::Timestamp;
use crate::store::postgres::Ts;

/// One value of a row on its way to `COPY`.
pub(super) type Value = Box<dyn ToSql + Send + Sync>;
pub(super) type Row = Vec<Value>;
/// Turns a SQLite row into the target's columns.
pub(super) type Convert = fn(&rusqlite::Row<'_>) -> Result<Row, String>;

/// One table: how to read it from SQLite and how to copy it into PostgreSQL.
pub(super) struct Table {
    pub(super) name: &'static str,
    /// The SQLite query; its columns feed `convert`.
    pub(super) select: &'static str,
    /// The PostgreSQL columns `convert` fills, in order, with their `types`.
    pub(super) columns: &'static str,
    pub(super) types: Vec<Type>,
    pub(super) convert: Convert,
}

/// Every table, parents before children (foreign keys hold at every step).
pub(super) fn tables() -> Vec<Table> {
    vec![
        merchants(),
        customers(),
        sessions(),
        one_time_codes(),
        transaction_intents(),
        events(),
        idempotency(),
        signing_keys(),
        subscriptions(),
        deliveries(),
        delivery_attempts(),
    ]
}

fn merchants() -> Table {
    Table {
        name: "merchants",
        select: "SELECT id, name, api_key_hash, disabled, created_on FROM merchants",
        columns: "id, name, api_key_hash, disabled, created_on",
        types: vec![Type::UUID, Type::TEXT, Type::BYTEA, Type::BOOL, Type::TIMESTAMPTZ],
        convert: |r| Ok(vec![uuid(r, 0)?, get::<String>(r, 1)?, get::<Vec<u8>>(r, 2)?, get::<bool>(r, 3)?, ts(r, 4)?]),
    }
}

fn customers() -> Table {
    Table {
        name: "customers",
        select: "SELECT id, phone, created_on, first_name, last_name FROM customers",
        columns: "id, phone, created_on, first_name, last_name",
        types: vec![Type::UUID, Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                get::<String>(r, 1)?,
                ts(r, 2)?,
                get::<Option<String>>(r, 3)?,
                get::<Option<String>>(r, 4)?,
            ])
        },
    }
}

fn sessions() -> Table {
    Table {
        name: "sessions",
        select: "SELECT id, merchant_id, state, spec, token, expires_on, created_on, last_modified_on,
                        last_correlation_id, version, customer_id, transaction_intent_id
                   FROM sessions",
        columns: "id, merchant_id, state, spec, amount, currency, token, expires_on, created_on, last_modified_on,
                  last_correlation_id, version, customer_id, transaction_intent_id",
        types: vec![
            Type::UUID,
            Type::UUID,
            Type::TEXT,
            Type::JSONB,
            Type::NUMERIC,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::UUID,
            Type::INT8,
            Type::UUID,
            Type::UUID,
        ],
        convert: session_row,
    }
}

fn one_time_codes() -> Table {
    Table {
        name: "one_time_codes",
        select: "SELECT session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on
                   FROM one_time_codes",
        columns: "session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on",
        types: vec![Type::UUID, Type::TEXT, Type::BYTEA, Type::TIMESTAMPTZ, Type::INT4, Type::INT4, Type::TIMESTAMPTZ],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                get::<String>(r, 1)?,
                get::<Option<Vec<u8>>>(r, 2)?,
                ts(r, 3)?,
                get::<i32>(r, 4)?,
                get::<i32>(r, 5)?,
                ts(r, 6)?,
            ])
        },
    }
}

fn transaction_intents() -> Table {
    Table {
        name: "transaction_intents",
        select: "SELECT id, merchant_id, session_id, customer_id, flow, amount_cents, currency, created_on
                   FROM transaction_intents",
        columns: "id, merchant_id, session_id, customer_id, flow, amount, currency, created_on",
        types: vec![
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::TEXT,
            Type::NUMERIC,
            Type::TEXT,
            Type::TIMESTAMPTZ,
        ],
        convert: |r| {
            let cents: i64 = r.get(5).map_err(|e| e.to_string())?;
            let cents = u64::try_from(cents).map_err(|_| {
                let id = r.get::<_, [u8; 16]>(0).map(Uuid::from_bytes).map(|u| u.to_string()).unwrap_or_default();
                format!("transaction intent {id} has a negative amount ({cents} cents)")
            })?;
            Ok(vec![
                uuid(r, 0)?,
                uuid(r, 1)?,
                uuid(r, 2)?,
                uuid(r, 3)?,
                get::<String>(r, 4)?,
                Box::new(Numeric(cents)),
                get::<String>(r, 6)?,
                ts(r, 7)?,
            ])
        },
    }
}

fn events() -> Table {
    Table {
        name: "events",
        select: "SELECT id, merchant_id, session_id, type, data, created_on FROM events",
        columns: "id, merchant_id, session_id, type, data, created_on",
        types: vec![Type::UUID, Type::UUID, Type::UUID, Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ],
        convert: |r| {
            Ok(vec![uuid(r, 0)?, uuid(r, 1)?, uuid(r, 2)?, get::<String>(r, 3)?, get::<String>(r, 4)?, ts(r, 5)?])
        },
    }
}

fn idempotency() -> Table {
    Table {
        name: "idempotency",
        select: "SELECT merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on,
                        session_id
                   FROM idempotency",
        columns: "merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on, session_id",
        types: vec![
            Type::UUID,
            Type::UUID,
            Type::BYTEA,
            Type::TIMESTAMPTZ,
            Type::INT4,
            Type::JSONB,
            Type::BYTEA,
            Type::TIMESTAMPTZ,
            Type::UUID,
        ],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                uuid(r, 1)?,
                get::<Vec<u8>>(r, 2)?,
                ts(r, 3)?,
                get::<Option<i32>>(r, 4)?,
                jsonb_opt(r, 5)?,
                get::<Option<Vec<u8>>>(r, 6)?,
                ts_opt(r, 7)?,
                uuid_opt(r, 8)?,
            ])
        },
    }
}

fn signing_keys() -> Table {
    Table {
        name: "signing_keys",
        select: "SELECT kid, secret, public, created_on, retired_on FROM signing_keys",
        columns: "kid, secret, public, created_on, retired_on",
        types: vec![Type::TEXT, Type::BYTEA, Type::BYTEA, Type::TIMESTAMPTZ, Type::TIMESTAMPTZ],
        convert: |r| {
            Ok(vec![get::<String>(r, 0)?, get::<Vec<u8>>(r, 1)?, get::<Vec<u8>>(r, 2)?, ts(r, 3)?, ts_opt(r, 4)?])
        },
    }
}

fn subscriptions() -> Table {
    Table {
        name: "subscriptions",
        // The replaced signing secret is sealed like the current one: copied as it is.
        select: "SELECT id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
                        last_modified_on, version, previous_secret, previous_secret_expires_on, state,
                        suspended_on, suspended_reason, failing_since
                   FROM subscriptions",
        columns: "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on, last_modified_on,
                  version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason,
                  failing_since",
        types: vec![
            Type::UUID,
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::INT8,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TIMESTAMPTZ,
        ],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                uuid(r, 1)?,
                get::<String>(r, 2)?,
                get::<String>(r, 3)?,
                get::<i32>(r, 4)?,
                get::<String>(r, 5)?,
                ts(r, 6)?,
                ts(r, 7)?,
                get::<i64>(r, 8)?,
                get::<Option<String>>(r, 9)?,
                ts_opt(r, 10)?,
                get::<String>(r, 11)?,
                ts_opt(r, 12)?,
                get::<Option<String>>(r, 13)?,
                ts_opt(r, 14)?,
            ])
        },
    }
}

fn deliveries() -> Table {
    Table {
        name: "deliveries",
        // The lease (lease_owner, lease_until) belonged to the old process: left NULL.
        select: "SELECT id, event_id, subscription_id, merchant_id, state, attempts, retry_index, next_attempt_on,
                        created_on, last_modified_on
                   FROM deliveries",
        columns: "id, event_id, subscription_id, merchant_id, state, attempts, retry_index, next_attempt_on,
                  created_on, last_modified_on",
        types: vec![
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::TEXT,
            Type::INT4,
            Type::INT4,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                uuid(r, 1)?,
                uuid(r, 2)?,
                uuid(r, 3)?,
                get::<String>(r, 4)?,
                get::<i32>(r, 5)?,
                get::<i32>(r, 6)?,
                ts(r, 7)?,
                ts(r, 8)?,
                ts(r, 9)?,
            ])
        },
    }
}

fn delivery_attempts() -> Table {
    Table {
        name: "delivery_attempts",
        select: "SELECT delivery_id, attempt, started_on, duration_ms, status, error FROM delivery_attempts",
        columns: "delivery_id, attempt, started_on, duration_ms, status, error",
        types: vec![Type::UUID, Type::INT4, Type::TIMESTAMPTZ, Type::INT8, Type::INT4, Type::TEXT],
        convert: |r| {
            Ok(vec![
                uuid(r, 0)?,
                get::<i32>(r, 1)?,
                ts(r, 2)?,
                get::<i64>(r, 3)?,
                get::<Option<i32>>(r, 4)?,
                get::<Option<String>>(r, 5)?,
            ])
        },
    }
}

/// A session, with `amount` and `currency` taken from its transaction data exactly as the
/// PostgreSQL store fills them when it creates a session.
fn session_row(r: &rusqlite::Row<'_>) -> Result<Row, String> {
    let spec_text: String = r.get(3).map_err(|e| e.to_string())?;
    let spec: SessionSpec = serde_json::from_str(&spec_text).map_err(|e| {
        let id = r.get::<_, [u8; 16]>(0).map(Uuid::from_bytes).map(|u| u.to_string()).unwrap_or_default();
        format!("session {id} has an unreadable spec: {e}")
    })?;
    let transaction = spec.transaction_data.as_ref();
    let amount: Option<Numeric> = transaction.map(|t| Numeric(t.amount.cents()));
    let currency: Option<&'static str> = transaction.map(|t| t.currency.code());
    Ok(vec![
        uuid(r, 0)?,
        uuid(r, 1)?,
        get::<String>(r, 2)?,
        Box::new(Jsonb(spec_text)),
        Box::new(amount),
        Box::new(currency),
        get::<String>(r, 4)?,
        ts(r, 5)?,
        ts(r, 6)?,
        ts(r, 7)?,
        uuid(r, 8)?,
        get::<i64>(r, 9)?,
        uuid_opt(r, 10)?,
        uuid_opt(r, 11)?,
    ])
}

fn get<T: rusqlite::types::FromSql + ToSql + Send + Sync + 'static>(
    r: &rusqlite::Row<'_>,
    index: usize,
) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, T>(index).map_err(|e| e.to_string())?))
}

fn uuid(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    let bytes: [u8; 16] = r.get(index).map_err(|e| e.to_string())?;
    Ok(Box::new(Uuid::from_bytes(bytes)))
}

fn uuid_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    let bytes: Option<[u8; 16]> = r.get(index).map_err(|e| e.to_string())?;
    Ok(Box::new(bytes.map(Uuid::from_bytes)))
}

fn ts(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(Ts(Timestamp::from_millis(r.get(index).map_err(|e| e.to_string())?))))
}

fn ts_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, Option<i64>>(index).map_err(|e| e.to_string())?.map(|ms| Ts(Timestamp::from_millis(ms)))))
}

fn jsonb_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, Option<String>>(index).map_err(|e| e.to_string())?.map(Jsonb)))
}
