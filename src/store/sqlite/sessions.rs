//! Sessions: the `SessionStore` of the SQLite store.

use super::*;

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
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let columns = SESSION_COLUMNS.split(", ").map(|column| format!("s.{column}")).collect::<Vec<_>>();
            format!(
                "SELECT m.id, m.name, m.disabled, m.created_on, {}
                   FROM merchants m LEFT JOIN sessions s ON s.id = ?2
                  WHERE m.api_key_hash = ?1",
                columns.join(", ")
            )
        });
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, id.as_bytes()], |row| {
                        let merchant = merchant_from_row(row)?;
                        let session = match row.get_ref(4)? {
                            rusqlite::types::ValueRef::Null => None,
                            _ => Some(session_at(row, 4)?),
                        };
                        Ok((merchant, session))
                    })
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
                match filter.state {
                    None => {}
                    Some(State::Expired) => {
                        sql.push_str(&format!(" AND (state = 'Expired' OR ({LIVE} AND expires_on <= ?2))"))
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
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions
                      WHERE {LIVE} AND expires_on <= ?1
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

    async fn session_events(&self, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>, StoreError> {
        self.readers
            .run(move |c| {
                let mut statement = c
                    .prepare_cached("SELECT id, type FROM events WHERE session_id = ?1 ORDER BY created_on, id")
                    .map_err(|e| internal(&e))?;
                let rows = statement
                    .query_map(params![session_id.as_bytes()], |row| {
                        let kind: String = row.get(1)?;
                        Ok((uuid_at(row, 0)?, kind))
                    })
                    .map_err(|e| internal(&e))?;
                let mut events = Vec::new();
                for row in rows {
                    let (id, kind) = row.map_err(|e| internal(&e))?;
                    let kind = parse_event_type(&kind)
                        .ok_or_else(|| StoreError::Internal(format!("unknown event type {kind}")))?;
                    events.push((id, kind));
                }
                Ok(events)
            })
            .await
    }
}
