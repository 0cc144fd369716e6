//! Sessions: the `SessionStore` of the SQLite store.

use super::*;

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    rows::session(row)
}

pub(super) fn load_session(connection: &Connection, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"));
    let mut statement = connection.prepare_cached(&SQL).map_err(|e| internal(&e))?;
    statement.query_row(params![id.as_bytes()], session_from_row).optional().map_err(|e| internal(&e))
}

/// Moves a live session to `to` with one conditional update (writing its customer and intent
/// as `session` has them), inserts its event and queues its deliveries. `None` when the condition no longer held (another writer won, or the clock
/// expired it); else how many deliveries were queued. An expiry is dated `expiresOn`, the
/// instant it happened, not the instant the sweep wrote it down, so that recording it does not
/// change what readers see.
pub(super) fn change_state(
    connection: &Connection,
    session: &SessionRecord,
    to: State,
    correlation_id: Uuid,
    now: Timestamp,
) -> Result<Option<usize>, StoreError> {
    // Built once: this runs on the writer, the thread every write waits for.
    static UPDATE: LazyLock<String> = LazyLock::new(|| {
        let live = LIVE.as_str();
        format!(
            "UPDATE sessions SET state = ?2, version = version + 1, last_modified_on = ?3,
                    last_correlation_id = ?4, customer_id = ?8, transaction_intent_id = ?9
              WHERE id = ?1 AND version = ?5 AND {live} AND (?6 = 0 OR expires_on > ?7)"
        )
    });
    let (changed_on, require_unexpired) = if to == State::Expired { (session.expires_on, false) } else { (now, true) };
    let changed = connection
        .prepare_cached(&UPDATE)
        .and_then(|mut s| {
            s.execute(params![
                session.id.as_bytes(),
                to.as_str(),
                changed_on.millis(),
                correlation_id.as_bytes(),
                session.version,
                require_unexpired,
                now.millis(),
                session.customer_id.map(|id| *id.as_bytes()),
                session.transaction_intent_id.map(|id| *id.as_bytes())
            ])
        })
        .map_err(|e| internal(&e))?;
    if changed == 0 {
        return Ok(None);
    }
    let Some(event) = EventType::for_state(to) else {
        return Ok(Some(0));
    };
    let data = crate::store::event_data(session, to, changed_on);
    let event_id = Uuid::now_v7();
    connection
        .prepare_cached(
            "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                event_id.as_bytes(),
                session.merchant_id.as_bytes(),
                session.id.as_bytes(),
                event.as_str(),
                data,
                now.millis()
            ])
        })
        .map_err(|e| internal(&e))?;
    webhooks::queue_deliveries(connection, event_id, session.merchant_id, event, now).map(Some)
}

/// Inserts `session` (its spec already as JSON) unless its id exists or its customer is unknown.
fn create_in(c: &Connection, session: SessionRecord, spec: String, insert: &str) -> Result<CreateOutcome, StoreError> {
    if let Some(customer) = session.spec.customer_id {
        let known = c
            .prepare_cached("SELECT 1 FROM customers WHERE id = ?1")
            .and_then(|mut s| s.exists(params![customer.as_bytes()]))
            .map_err(|e| internal(&e))?;
        if !known {
            // An existing session is answered as such whatever its body says.
            return Ok(match load_session(c, session.id)? {
                Some(existing) => CreateOutcome::Exists(existing),
                None => CreateOutcome::CustomerNotFound,
            });
        }
    }
    // Insert first and look only when the id was taken: one index search for a
    // new session instead of two.
    let inserted = c
        .prepare_cached(insert)
        .and_then(|mut s| {
            s.execute(params![
                session.id.as_bytes(),
                session.merchant_id.as_bytes(),
                session.state.as_str(),
                spec,
                session.token,
                session.expires_on.millis(),
                session.created_on.millis(),
                session.last_modified_on.millis(),
                session.last_correlation_id.as_bytes(),
                session.version,
                session.customer_id.map(|id| *id.as_bytes()),
                session.transaction_intent_id.map(|id| *id.as_bytes())
            ])
        })
        .map_err(|e| internal(&e))?;
    if inserted == 1 {
        return Ok(CreateOutcome::Created(session));
    }
    let existing = load_session(c, session.id)?
        .ok_or_else(|| StoreError::Internal("a session id conflicted but no session has it".to_owned()))?;
    Ok(CreateOutcome::Exists(existing))
}

/// Cancels the session `request` names, or says why not; answers how many deliveries it queued.
fn cancel_in(c: &Connection, request: CancelRequest) -> Result<(CancelOutcome, usize), StoreError> {
    match decide_cancel(load_session(c, request.session_id)?, &request) {
        CancelDecision::Answer(outcome) => Ok((outcome, 0)),
        CancelDecision::Change(session, to) => {
            let Some(queued) = change_state(c, &session, to, request.correlation_id, request.now)? else {
                // Cannot happen with one writer; kept so both backends share one shape.
                return Ok((CancelOutcome::VersionMismatch, 0));
            };
            Ok((CancelOutcome::Cancelled(session.changed(to, request.now, request.correlation_id)), queued))
        }
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session_guarded(
        &self,
        session: SessionRecord,
        guard: Option<Guard<CreateOutcome>>,
    ) -> Result<Guarded<CreateOutcome>, StoreError> {
        // Everything that does not need the database happens here, off the writer's thread:
        // the writer is the one thread every write waits for.
        let spec = serde_json::to_string(&session.spec).map_err(|e| StoreError::Internal(e.to_string()))?;
        static INSERT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (id) DO NOTHING"
            )
        });
        let (outcome, _) = self
            .writer
            .run_undoable(move |c| {
                idempotency::guarded(c, guard, |c| create_in(c, session, spec, &INSERT).map(|o| (o, 0)))
            })
            .await?;
        Ok(outcome)
    }

    async fn get_session(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        self.point_reads.run(move |c| load_session(c, id)).await
    }

    async fn merchant_and_session(
        &self,
        key_hash: [u8; 32],
        id: Uuid,
    ) -> Result<(Option<Merchant>, Option<SessionRecord>), StoreError> {
        // One statement: one job of a read batch instead of two.
        static SQL: LazyLock<String> = LazyLock::new(|| rows::numbered(&rows::MERCHANT_AND_SESSION));
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, id.as_bytes()], |row| rows::merchant_and_session(row))
                    .optional()
                    .map_err(|e| internal(&e))?;
                Ok(found.map_or((None, None), |(merchant, session)| (Some(merchant), session)))
            })
            .await
    }

    async fn list_sessions(
        &self,
        merchant_id: Uuid,
        filter: SessionFilter,
        now: Timestamp,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        self.readers
            .run(move |c| {
                let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE merchant_id = ?1");
                let live = LIVE.as_str();
                match filter.state {
                    None => {}
                    Some(State::Expired) => {
                        sql.push_str(&format!(" AND (state = 'Expired' OR ({live} AND expires_on <= ?2))"))
                    }
                    Some(state) if LIVE_STATES.contains(&state) => {
                        sql.push_str(&format!(" AND state = '{}' AND expires_on > ?2", state.as_str()))
                    }
                    Some(state) => sql.push_str(&format!(" AND state = '{}'", state.as_str())),
                }
                sql.push_str(" AND created_on >= ?3 AND created_on < ?4 AND (created_on, id) < (?5, ?6)");
                sql.push_str(" ORDER BY created_on DESC, id DESC LIMIT ?7");
                let (after_time, after_id) =
                    filter.after.map(|(t, id)| (t.millis(), *id.as_bytes())).unwrap_or((i64::MAX, [0xff; 16]));
                let mut statement = c.prepare_cached(&sql).map_err(|e| internal(&e))?;
                let rows = statement
                    .query_map(
                        params![
                            merchant_id.as_bytes(),
                            now.millis(),
                            filter.created_from.map_or(i64::MIN, Timestamp::millis),
                            filter.created_to.map_or(i64::MAX, Timestamp::millis),
                            after_time,
                            after_id,
                            (filter.limit + 1) as i64
                        ],
                        session_from_row,
                    )
                    .map_err(|e| internal(&e))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(|e| internal(&e))
            })
            .await
    }

    async fn cancel_session_guarded(
        &self,
        request: CancelRequest,
        guard: Option<Guard<CancelOutcome>>,
    ) -> Result<Guarded<CancelOutcome>, StoreError> {
        let (outcome, queued) =
            self.writer.run_undoable(move |c| idempotency::guarded(c, guard, |c| cancel_in(c, request))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn expire_due(&self, now: Timestamp, batch: usize) -> Result<usize, StoreError> {
        let (expired, queued) = self
            .writer
            .run(move |c| {
                let live = LIVE.as_str();
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions
                      WHERE {live} AND expires_on <= ?1
                      ORDER BY expires_on LIMIT ?2"
                );
                let due: Vec<SessionRecord> = c
                    .prepare_cached(&sql)
                    .and_then(|mut s| s.query_map(params![now.millis(), batch as i64], session_from_row)?.collect())
                    .map_err(|e| internal(&e))?;
                let (mut expired, mut queued) = (0, 0);
                for session in &due {
                    if let Some(deliveries) =
                        change_state(c, session, State::Expired, session.last_correlation_id, now)?
                    {
                        expired += 1;
                        queued += deliveries;
                    }
                }
                Ok((expired, queued))
            })
            .await?;
        self.queued_deliveries(queued);
        Ok(expired)
    }
}

#[cfg(test)]
#[async_trait]
impl crate::store::Inspect for SqliteStore {
    async fn session_events(&self, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>, StoreError> {
        self.readers
            .run(move |c| {
                let mut statement = c
                    .prepare_cached("SELECT id, type FROM events WHERE session_id = ?1 ORDER BY created_on, id")
                    .map_err(|e| internal(&e))?;
                let rows = statement
                    .query_map(params![session_id.as_bytes()], |row| Ok((uuid_at(row, 0)?, row.get::<_, String>(1)?)))
                    .map_err(|e| internal(&e))?;
                let mut events = Vec::new();
                for row in rows {
                    let (id, kind) = row.map_err(|e| internal(&e))?;
                    let kind = EventType::parse(&kind)
                        .ok_or_else(|| StoreError::Internal(format!("unknown event type {kind}")))?;
                    events.push((id, kind));
                }
                Ok(events)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migrated() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let connection = connect(&dir.path().join("d.db"), true).unwrap();
        schema::migrate(&connection).unwrap();
        (connection, dir)
    }

    #[test]
    fn writes_of_a_session_build_no_temporary_tables_and_the_sweep_uses_its_index() {
        let (connection, _dir) = migrated();
        let opcodes = |sql: &str| -> Vec<String> {
            let mut statement = connection.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let params = vec![rusqlite::types::Value::Null; statement.parameter_count()];
            let rows = statement.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(1)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        let insert = format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        );
        let live = LIVE.as_str();
        let update =
            format!("UPDATE sessions SET state = ?2, version = version + 1 WHERE id = ?1 AND version = ?3 AND {live}");
        for sql in [insert, update] {
            assert!(!opcodes(&sql).iter().any(|op| op == "OpenEphemeral"), "{sql}");
        }
        let plan: String = connection
            .query_row(
                &format!("EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE {live} AND expires_on <= ?1"),
                [0],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("sessions_due"), "{plan}");
    }
}
