//! The hot path's statements: the re-check before each call, the record of outcomes (attempt
//! log and ledger) and the source update. They run on lanes (connections kept between uses,
//! see `lane`) and in a few fixed sizes: a batch is cut into pieces of at most [`LARGEST`] rows
//! and each piece is padded up to the next of [`SIZES`], so the same few statement texts repeat
//! and each is prepared once per connection.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::core::{Arg, SqlStore, millis, ms, opt_int, query_owned, text};
use super::dialect::{Dialect, Stmt};
use super::lane::{Failed, on_lane};
use super::{FlatDecision, Op, Recheck, Result, Settlement};

/// Rows per multi-row statement: a piece of a batch is padded up to the next of these.
pub(crate) const SIZES: [usize; 5] = [1, 4, 16, 64, 256];
/// The largest piece of a batch one statement takes.
pub(crate) const LARGEST: usize = SIZES[SIZES.len() - 1];

/// The index in [`SIZES`] of the smallest size that takes `n` rows (`n` ≤ [`LARGEST`]).
fn size_index(n: usize) -> usize {
    SIZES
        .iter()
        .position(|&size| size >= n)
        .expect("pieces are at most LARGEST")
}

/// Placeholders `$first`, `$first+1`, … for `n` rows of `width` values each, one string per
/// row (the values of a row separated by commas).
fn row_placeholders(n: usize, first: usize, width: usize) -> Vec<Vec<String>> {
    (0..n)
        .map(|r| {
            (0..width)
                .map(|c| format!("${}", first + r * width + c))
                .collect()
        })
        .collect()
}

/// The hot path's statements, one per entry of [`SIZES`].
pub(crate) struct HotStatements {
    recheck: Vec<Stmt>,
    attempts: Vec<Stmt>,
    /// The ledger update; it returns the tokens it settled, except on MySQL (no `RETURNING`).
    settle: Vec<Stmt>,
    /// MySQL: the leases still ours among a piece, locked until the end of the transaction.
    held: Vec<Stmt>,
    mark_source: Vec<Stmt>,
    mark_note: Vec<Stmt>,
    /// PostgreSQL: the whole record of a batch as one statement.
    record_one: Option<Stmt>,
    /// PostgreSQL: the source update and its note in the ledger as one statement.
    mark_one: Vec<Stmt>,
}

/// What the hot statements are rendered from.
pub(crate) struct HotShape<'a> {
    /// "The session behind ledger row `l` is still idle", with `$2` the active value and `$3`
    /// the idle cutoff.
    pub still_idle: &'a str,
    /// A text placeholder `{}` as a value comparable with the source's token column.
    pub token_from_text: &'a str,
    /// The idle cutoff in the column's own terms, as `$3`.
    pub cutoff: &'a str,
    /// The condition that the source row's time can be read.
    pub fits: &'a str,
}

impl HotStatements {
    /// Renders every statement in every size.
    pub(crate) fn render(store: &SqlStore, shape: &HotShape<'_>) -> Self {
        let each = |f: &dyn Fn(usize) -> String| -> Vec<Stmt> {
            SIZES.iter().map(|&n| store.dialect.render(&f(n))).collect()
        };
        let pg = store.dialect == Dialect::Postgres;
        Self {
            recheck: each(&|n| recheck_sql(store.dialect, shape, n)),
            attempts: if pg {
                Vec::new()
            } else {
                each(&|n| attempts_sql(n))
            },
            settle: if pg {
                Vec::new()
            } else {
                each(&|n| settle_sql(store, n))
            },
            held: if store.dialect == Dialect::MySql {
                each(&|n| held_sql(n))
            } else {
                Vec::new()
            },
            mark_source: each(&|n| mark_source_sql(store, shape, n)),
            mark_note: each(&|n| mark_note_sql(n, 1)),
            record_one: pg.then(|| store.dialect.render(&record_one_sql(store))),
            mark_one: if pg {
                each(&|n| {
                    format!(
                        "WITH marked AS ({}) {}",
                        mark_source_sql(store, shape, n),
                        mark_note_sql(n, 4)
                    )
                })
            } else {
                Vec::new()
            },
        }
    }
}

/// `n` placeholders from `$first` on, as a list.
fn placeholder_list(n: usize, first: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|k| format!("${k}")).collect();
    list.join(", ")
}

/// $1 worker, $2 active value, $3 idle cutoff, $4… tokens.
fn recheck_sql(d: Dialect, shape: &HotShape<'_>, n: usize) -> String {
    format!(
        "SELECT l.session_token, {}, {} FROM sweeper_sessions l WHERE l.session_token IN ({})",
        d.flag("l.lease_owner = $1"),
        d.flag(shape.still_idle),
        placeholder_list(n, 4)
    )
}

/// $1 worker, then ten values per call; a row whose token is NULL is padding.
fn attempts_sql(n: usize) -> String {
    let names = [
        "t", "a", "c", "o", "h", "e", "m", "l", "s", "f", // see `attempt_args`
    ];
    let rows: Vec<String> = row_placeholders(n, 2, names.len())
        .iter()
        .map(|row| {
            let cols: Vec<String> = row
                .iter()
                .zip(names)
                .map(|(p, name)| format!("{p} AS {name}"))
                .collect();
            format!("SELECT {}", cols.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO sweeper_attempts (session_token, attempt, worker_id, conversation_id, \
         outcome, http_status, error_code, error_message, latency_ms, started_at, finished_at) \
         SELECT u.t, u.a, $1, u.c, u.o, u.h, u.e, u.m, u.l, u.s, u.f FROM ({}) u \
         WHERE u.t IS NOT NULL",
        rows.join(" UNION ALL ")
    )
}

/// $1 worker, then six values per settlement (see `settle`); padding repeats a row. SQLite
/// and MySQL (PostgreSQL records a batch in one statement, see `record_one_sql`).
fn settle_sql(store: &SqlStore, n: usize) -> String {
    // SQLite's writers never wait inside a statement (the write lock is taken at BEGIN
    // IMMEDIATE), and MySQL locks the rows first (`held_sql`): no row is re-checked mid-way.
    let derived: Vec<String> = row_placeholders(n, 2, 6)
        .iter()
        .map(|p| {
            format!(
                "SELECT {} AS token, {} AS state, {} AS attempts, {} AS retry_ms, {} AS code, {} AS msg",
                p[0], p[1], p[2], p[3], p[4], p[5]
            )
        })
        .collect();
    let update = settle_update(store, &derived.join(" UNION ALL "));
    match store.dialect {
        // The update itself says which leases were still ours: no locking read first.
        Dialect::Sqlite => format!("{update} RETURNING session_token"),
        _ => update,
    }
}

/// PostgreSQL: a whole batch in one statement (one round trip, its own transaction). The calls
/// ($2) and the settlements ($3) travel as JSON arrays of arrays, so one text takes any batch;
/// $1 is the worker. The ledger update joins the rows of a function, not a UNION ALL of
/// one-row SELECTs: when it waits for a row that a lease renewal holds and re-checks it once
/// that commits, PostgreSQL forgets the rest of such a UNION ALL, and its sessions would stay
/// unsettled.
fn record_one_sql(store: &SqlStore) -> String {
    let update = settle_update(
        store,
        "SELECT e->>0 AS token, e->>1 AS state, CAST(e->>2 AS int8) AS attempts, \
         CAST(e->>3 AS int8) AS retry_ms, e->>4 AS code, e->>5 AS msg \
         FROM json_array_elements(CAST($3 AS json)) AS e",
    );
    format!(
        "WITH logged AS (INSERT INTO sweeper_attempts (session_token, attempt, worker_id, \
         conversation_id, outcome, http_status, error_code, error_message, latency_ms, started_at, \
         finished_at) SELECT e->>0, CAST(e->>1 AS int8), $1, e->>2, e->>3, CAST(e->>4 AS int8), \
         e->>5, e->>6, CAST(e->>7 AS int8), CAST(e->>8 AS int8), CAST(e->>9 AS int8) \
         FROM json_array_elements(CAST($2 AS json)) AS e) {update} RETURNING session_token"
    )
}

/// The ledger update of a record: the rows of `derived` (token, state, attempts, retry_ms,
/// code, msg) settle the sessions whose lease `$1` still holds.
fn settle_update(store: &SqlStore, derived: &str) -> String {
    let d = store.dialect;
    let now = d.now_ms();
    let owed = if store.source.mark_passive {
        "0"
    } else {
        "NULL"
    };
    // A NULL state releases the lease and leaves everything else as it was.
    let keep =
        |col: &str, new: &str| format!("CASE WHEN u.state IS NULL THEN l.{col} ELSE {new} END");
    let sets = [
        ("state", "COALESCE(u.state, l.state)".to_owned()),
        ("attempts", "COALESCE(u.attempts, l.attempts)".to_owned()),
        (
            "next_attempt_at",
            keep(
                "next_attempt_at",
                &format!("CASE WHEN u.retry_ms IS NULL THEN NULL ELSE {now} + u.retry_ms END"),
            ),
        ),
        ("last_error_code", keep("last_error_code", "u.code")),
        ("last_error_message", keep("last_error_message", "u.msg")),
        (
            "source_marked",
            format!(
                "CASE WHEN u.state IN ('invalidated', 'already_invalidated') THEN {owed} ELSE l.source_marked END"
            ),
        ),
        (
            "settled_at",
            format!(
                "CASE WHEN u.state IS NULL THEN l.settled_at WHEN u.state = 'pending' THEN NULL ELSE {now} END"
            ),
        ),
        ("lease_owner", "NULL".to_owned()),
        ("lease_expires_at", "NULL".to_owned()),
        ("updated_at", now.to_owned()),
    ];
    d.update_from(
        "sweeper_sessions",
        &sets,
        derived,
        "l.session_token = u.token",
        "l.lease_owner = $1",
    )
}

/// $1 worker, $2… tokens.
fn held_sql(n: usize) -> String {
    format!(
        "SELECT session_token FROM sweeper_sessions WHERE lease_owner = $1 \
         AND session_token IN ({}) FOR UPDATE",
        placeholder_list(n, 2)
    )
}

/// Notes in the ledger that `n` sessions' source rows are marked: tokens from `$first` on.
fn mark_note_sql(n: usize, first: usize) -> String {
    format!(
        "UPDATE sweeper_sessions SET source_marked = 1 WHERE session_token IN ({})",
        placeholder_list(n, first)
    )
}

/// $1 passive value, $2 active value, $3 idle cutoff, then per token its text (and on SQLite
/// its integer value or NULL: a column without text affinity stores an integer token as an
/// integer). Only rows still idle are marked: a duplicate token touched a moment ago stays
/// active.
fn mark_source_sql(store: &SqlStore, shape: &HotShape<'_>, n: usize) -> String {
    let d = store.dialect;
    let table = store.col(&store.source.table);
    let tok = store.col(&store.source.token_column);
    let status = store.col(&store.source.status_column);
    let last = store.col(&store.source.last_activity_column);
    let width = if d == Dialect::Sqlite { 2 } else { 1 };
    let list: Vec<String> = row_placeholders(n, 4, width)
        .into_iter()
        .flat_map(|row| {
            let mut row = row.into_iter();
            let text = shape
                .token_from_text
                .replace("{}", &row.next().expect("a text"));
            std::iter::once(text).chain(row)
        })
        .collect();
    // MySQL's collations fold case and ignore trailing spaces: after the index finds the
    // candidates, the bytes must match too, or another shopper's row would be marked.
    let exact = match d {
        Dialect::MySql => format!(
            " AND CAST(CONVERT(s.{tok} USING utf8mb4) AS BINARY) IN ({})",
            list.iter()
                .map(|p| format!("CAST({p} AS BINARY)"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => String::new(),
    };
    // SQLite's planner prefers a range scan of the idle index to a long `IN` list of tokens,
    // and then reads every idle row: `(…) = 1` keeps the same test but takes its index away.
    let unindexed = |condition: String| match d {
        Dialect::Sqlite => format!("({condition}) = 1"),
        _ => condition,
    };
    format!(
        "UPDATE {table} AS s SET {status} = $1 WHERE s.{tok} IN ({}){exact} AND {} AND {} AND {}",
        list.join(", "),
        unindexed(format!("s.{status} = $2")),
        unindexed(format!("s.{last} < {}", shape.cutoff)),
        shape.fits
    )
}

/// `piece` padded to `size` items by repeating its last one.
fn padded<T>(piece: &[T], size: usize) -> impl Iterator<Item = &T> {
    (0..size).map(|k| piece.get(k).unwrap_or(&piece[piece.len() - 1]))
}

/// A batch as the two JSON arrays PostgreSQL's one-statement record reads: its calls, then its
/// settlements (see `record_one_sql` for the columns).
fn record_json(batch: &[Settlement]) -> (String, String) {
    let calls: Vec<_> = batch
        .iter()
        .flat_map(|s| {
            s.calls.iter().map(move |c| {
                let latency = millis(c.latency);
                (
                    s.token.as_str(),
                    s.attempt,
                    c.conversation_id.as_str(),
                    c.class,
                    c.http_status,
                    c.error_code.as_deref(),
                    c.error_message.as_deref(),
                    latency,
                    ms(c.started_at),
                    ms(c.started_at).saturating_add(latency),
                )
            })
        })
        .collect();
    let settlements: Vec<_> = batch
        .iter()
        .map(|s| {
            let f = FlatDecision::of(&s.decision);
            (
                s.token.as_str(),
                f.state,
                f.attempts,
                f.retry_in.map(millis),
                f.error_code,
                f.error_message,
            )
        })
        .collect();
    (
        serde_json::to_string(&calls).expect("strings and numbers serialize"),
        serde_json::to_string(&settlements).expect("strings and numbers serialize"),
    )
}

/// The re-check's verdict on each of `tokens`, from the rows it returned (token, lease still
/// ours, still idle); a token without a row has lost its lease.
fn verdicts<'a>(tokens: &'a [&str], rows: &[AnyRow]) -> impl Iterator<Item = Recheck> + 'a {
    let found: HashMap<String, Recheck> = rows
        .iter()
        .filter_map(|r| {
            let verdict = if opt_int(r, 1) != Some(1) {
                Recheck::LeaseLost
            } else if opt_int(r, 2) != Some(1) {
                Recheck::NoLongerEligible
            } else {
                Recheck::Eligible
            };
            Some((text(r, 0)?, verdict))
        })
        .collect();
    tokens
        .iter()
        .map(move |t| found.get(*t).copied().unwrap_or(Recheck::LeaseLost))
}

impl SqlStore {
    /// The re-checks of `tokens` (see `Store::recheck_many`), on the re-check lane.
    pub(crate) async fn recheck_on_lane(
        &self,
        worker: &str,
        tokens: &[&str],
        idle_before: DateTime<Utc>,
    ) -> Result<Vec<Recheck>> {
        let sql = self.sql().await?;
        let cutoff = self.cutoff(sql.shape.activity, idle_before);
        on_lane!(self, self.lanes.recheck, "rechecking sessions", |conn| {
            self.recheck_pieces(&sql.hot, conn, worker, tokens, &cutoff)
                .await
        })
    }

    async fn recheck_pieces(
        &self,
        hot: &HotStatements,
        conn: &mut AnyConnection,
        worker: &str,
        tokens: &[&str],
        cutoff: &Arg,
    ) -> std::result::Result<Vec<Recheck>, Failed> {
        let mut verdicts = Vec::with_capacity(tokens.len());
        for (i, piece) in tokens.chunks(LARGEST).enumerate() {
            let size = size_index(piece.len());
            let mut args = Vec::with_capacity(3 + SIZES[size]);
            args.extend([
                Arg::Text(worker.to_owned()),
                Arg::Text(self.source.active_value.clone()),
                cutoff.clone(),
            ]);
            let last = piece[piece.len() - 1];
            args.extend(
                (0..SIZES[size]).map(|k| Arg::Text(piece.get(k).unwrap_or(&last).to_string())),
            );
            let rows = query_owned(&hot.recheck[size], args)
                .fetch_all(&mut *conn)
                .await
                .op("rechecking sessions")
                .map_err(|e| {
                    if i == 0 {
                        Failed::First(e)
                    } else {
                        Failed::Later(e)
                    }
                })?;
            verdicts.extend(self::verdicts(piece, &rows));
        }
        Ok(verdicts)
    }

    /// Writes a batch of settlements (see `Store::record`), on the record lane.
    pub(crate) async fn record_on_lane(
        &self,
        worker: &str,
        batch: &[Settlement],
    ) -> Result<Vec<String>> {
        let sql = self.sql().await?;
        if let Some(one) = &sql.hot.record_one {
            let (calls, settlements) = record_json(batch);
            // One statement: a failure may come after it ran, so it is never simply sent
            // again here (the recorder decides, as for any failed write).
            return on_lane!(self, self.lanes.record, "recording outcomes", |conn| {
                query_owned(
                    one,
                    vec![
                        Arg::Text(worker.to_owned()),
                        Arg::Text(calls.clone()),
                        Arg::Text(settlements.clone()),
                    ],
                )
                .fetch_all(conn)
                .await
                .op("recording outcomes")
                .map(|rows| rows.iter().filter_map(|r| text(r, 0)).collect())
                .map_err(Failed::Later)
            });
        }
        on_lane!(self, self.lanes.record, "starting to record", |conn| {
            self.record_tx(&sql.hot, conn, worker, batch).await
        })
    }

    async fn record_tx(
        &self,
        hot: &HotStatements,
        conn: &mut AnyConnection,
        worker: &str,
        batch: &[Settlement],
    ) -> std::result::Result<Vec<String>, Failed> {
        let mut tx = self
            .begin_on(conn, "starting to record")
            .await
            .map_err(Failed::First)?;
        self.insert_attempts(hot, &mut tx, worker, batch)
            .await
            .map_err(Failed::Later)?;
        let mut accepted = Vec::with_capacity(batch.len());
        for piece in batch.chunks(LARGEST) {
            accepted.extend(
                self.settle(hot, &mut tx, worker, piece)
                    .await
                    .map_err(Failed::Later)?,
            );
        }
        tx.commit()
            .await
            .op("committing recorded outcomes")
            .map_err(Failed::Later)?;
        Ok(accepted)
    }

    /// Every call of the batch goes into the attempt log, whoever holds the lease now.
    async fn insert_attempts(
        &self,
        hot: &HotStatements,
        tx: &mut AnyConnection,
        worker: &str,
        batch: &[Settlement],
    ) -> Result<()> {
        let calls: Vec<_> = batch
            .iter()
            .flat_map(|s| s.calls.iter().map(move |c| (s, c)))
            .collect();
        for piece in calls.chunks(LARGEST) {
            let size = size_index(piece.len());
            let mut args = Vec::with_capacity(1 + 10 * SIZES[size]);
            args.push(Arg::Text(worker.to_owned()));
            for (s, c) in piece {
                let latency = millis(c.latency);
                args.extend([
                    Arg::Text(s.token.clone()),
                    Arg::Int(i64::from(s.attempt)),
                    Arg::Text(c.conversation_id.clone()),
                    Arg::Text(c.class.to_owned()),
                    Arg::opt_int(c.http_status.map(i64::from)),
                    Arg::opt_text(c.error_code.as_deref()),
                    Arg::opt_text(c.error_message.as_deref()),
                    Arg::Int(latency),
                    Arg::Int(ms(c.started_at)),
                    Arg::Int(ms(c.started_at).saturating_add(latency)),
                ]);
            }
            for _ in piece.len()..SIZES[size] {
                args.extend([
                    Arg::NullText,
                    Arg::NullInt,
                    Arg::NullText,
                    Arg::NullText,
                    Arg::NullInt,
                    Arg::NullText,
                    Arg::NullText,
                    Arg::NullInt,
                    Arg::NullInt,
                    Arg::NullInt,
                ]);
            }
            query_owned(&hot.attempts[size], args)
                .execute(&mut *tx)
                .await
                .op("recording attempts")?;
        }
        Ok(())
    }

    /// Settles the rows of `piece` whose lease `worker` still holds; returns their tokens.
    async fn settle(
        &self,
        hot: &HotStatements,
        tx: &mut AnyConnection,
        worker: &str,
        piece: &[Settlement],
    ) -> Result<Vec<String>> {
        let size = size_index(piece.len());
        let last = &piece[piece.len() - 1];
        let held = if self.dialect == Dialect::MySql {
            let mut args = Vec::with_capacity(1 + SIZES[size]);
            args.push(Arg::Text(worker.to_owned()));
            args.extend(
                (0..SIZES[size]).map(|k| Arg::Text(piece.get(k).unwrap_or(last).token.clone())),
            );
            let rows = query_owned(&hot.held[size], args)
                .fetch_all(&mut *tx)
                .await
                .op("reading held leases")?;
            let held: Vec<String> = rows.iter().filter_map(|r| text(r, 0)).collect();
            if held.is_empty() {
                return Ok(held);
            }
            Some(held)
        } else {
            None
        };
        let mut args = Vec::with_capacity(1 + 6 * SIZES[size]);
        args.push(Arg::Text(worker.to_owned()));
        for k in 0..SIZES[size] {
            let s = piece.get(k).unwrap_or(last);
            let f = FlatDecision::of(&s.decision);
            args.extend([
                Arg::Text(s.token.clone()),
                Arg::opt_text(f.state),
                Arg::opt_int(f.attempts.map(i64::from)),
                Arg::opt_int(f.retry_in.map(millis)),
                Arg::opt_text(f.error_code),
                Arg::opt_text(f.error_message),
            ]);
        }
        let update = query_owned(&hot.settle[size], args);
        match held {
            Some(held) => {
                update.execute(&mut *tx).await.op("settling sessions")?;
                Ok(held)
            }
            None => Ok(update
                .fetch_all(&mut *tx)
                .await
                .op("settling sessions")?
                .iter()
                .filter_map(|r| text(r, 0))
                .collect()),
        }
    }

    /// Marks source rows passive and notes it (see `Store::mark_passive`), on the record lane.
    pub(crate) async fn mark_on_lane(
        &self,
        tokens: &[String],
        idle_before: DateTime<Utc>,
    ) -> Result<u64> {
        let sql = self.sql().await?;
        let cutoff = self.cutoff(sql.shape.activity, idle_before);
        if !sql.hot.mark_one.is_empty() && tokens.len() <= LARGEST {
            // One statement that marks and notes (its own transaction); sent again at once
            // only when it failed on a kept connection, which is harmless: marking is
            // idempotent.
            return on_lane!(self, self.lanes.mark, "marking sessions passive", |conn| {
                let size = size_index(tokens.len());
                let mut args = self.mark_args(tokens, size, &cutoff);
                args.extend(padded(tokens, SIZES[size]).map(|t| Arg::Text(t.clone())));
                query_owned(&sql.hot.mark_one[size], args)
                    .execute(conn)
                    .await
                    .op("marking sessions passive")
                    .map(|done| done.rows_affected())
                    .map_err(Failed::First)
            });
        }
        on_lane!(
            self,
            self.lanes.mark,
            "starting to mark sessions passive",
            |conn| self.mark_tx(&sql.hot, conn, tokens, &cutoff).await
        )
    }

    async fn mark_tx(
        &self,
        hot: &HotStatements,
        conn: &mut AnyConnection,
        tokens: &[String],
        cutoff: &Arg,
    ) -> std::result::Result<u64, Failed> {
        let mut tx = self
            .begin_on(conn, "starting to mark sessions passive")
            .await
            .map_err(Failed::First)?;
        let mut noted = 0;
        for piece in tokens.chunks(LARGEST) {
            let size = size_index(piece.len());
            query_owned(&hot.mark_source[size], self.mark_args(piece, size, cutoff))
                .execute(&mut *tx)
                .await
                .op("marking sessions passive")
                .map_err(Failed::Later)?;
            let args = padded(piece, SIZES[size])
                .map(|t| Arg::Text(t.clone()))
                .collect();
            noted += query_owned(&hot.mark_note[size], args)
                .execute(&mut *tx)
                .await
                .op("noting marked sessions")
                .map_err(Failed::Later)?
                .rows_affected();
        }
        tx.commit()
            .await
            .op("committing marked sessions")
            .map_err(Failed::Later)?;
        Ok(noted)
    }

    /// The source update's arguments for `piece` padded to `SIZES[size]` tokens.
    fn mark_args(&self, piece: &[String], size: usize, cutoff: &Arg) -> Vec<Arg> {
        let mut args = vec![
            Arg::Text(self.source.passive_value.clone()),
            Arg::Text(self.source.active_value.clone()),
            cutoff.clone(),
        ];
        for t in padded(piece, SIZES[size]) {
            args.push(Arg::Text(t.clone()));
            if self.dialect == Dialect::Sqlite {
                args.push(match t.parse::<i64>() {
                    Ok(i) if i.to_string() == *t => Arg::Int(i),
                    _ => Arg::NullInt,
                });
            }
        }
        args
    }

    /// A write transaction on `conn` (SQLite takes its write lock at once).
    pub(crate) async fn begin_on<'c>(
        &self,
        conn: &'c mut AnyConnection,
        op: &'static str,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>> {
        use sqlx::Connection as _;
        match self.dialect.begin_write() {
            Some(begin) => conn.begin_with(begin).await.op(op),
            None => conn.begin().await.op(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// SQLite plans a statement for the statistics it has, and a fresh file has none: every
    /// hot statement, in every size, must still find its rows by key, driven by the batch,
    /// whatever the size of the ledger or the number of leases we hold.
    #[tokio::test]
    async fn sqlite_hot_statements_are_driven_by_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("plan.db").display());
        let config = Config::from_toml_str(
            &format!(
                "[database]\nurl = \"{url}\"\n[source]\ntable = \"checkout_sessions\"\n\
                 token_column = \"session_token\"\nmember_column = \"member_identifier\"\n\
                 status_column = \"status\"\nlast_activity_column = \"last_activity_at\"\n\
                 active_value = \"ACTIVE\"\npassive_value = \"PASSIVE\"\nidle_after = \"30m\"\n\
                 [iyzico]\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\nsecret_key = \"s\"\n"
            ),
            [],
        )
        .unwrap();
        let store = SqlStore::connect(&url, Dialect::Sqlite, 2, config.source.clone())
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, \
             member_identifier TEXT NOT NULL, status TEXT NOT NULL, last_activity_at TEXT); \
             CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        super::super::sqlite::migrate(&store).await.unwrap();
        let hot = &store.sql().await.unwrap().hot;
        for stmt in [
            &hot.recheck,
            &hot.attempts,
            &hot.settle,
            &hot.mark_source,
            &hot.mark_note,
        ]
        .into_iter()
        .flatten()
        {
            let explain = Stmt {
                text: format!("EXPLAIN QUERY PLAN {}", stmt.text),
                binds: stmt.binds.clone(),
            };
            let args = (0..=*stmt.binds.iter().max().unwrap())
                .map(|_| Arg::NullText)
                .collect();
            let plan: Vec<String> = query_owned(&explain, args)
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .filter_map(|r| text(r, 3))
                .collect();
            let scans: Vec<&String> = plan
                .iter()
                .filter(|l| {
                    let scanned = l.strip_prefix("SCAN ").and_then(|t| t.split(' ').next());
                    // Scanning the batch itself (`u`, constant rows) is what drives it.
                    matches!(
                        scanned,
                        Some("l" | "s" | "sweeper_sessions" | "checkout_sessions")
                    )
                })
                .collect();
            assert!(
                scans.is_empty(),
                "{}\nscans a table instead of finding rows by key: {plan:#?}",
                stmt.text
            );
            if stmt.text.contains("UPDATE sweeper_sessions AS l") {
                let at = |step: &str| plan.iter().position(|l| l.contains(step));
                assert!(
                    matches!((at("SCAN u"), at("SEARCH l")), (Some(u), Some(l)) if u < l),
                    "the batch must drive the ledger update, not our leases: {plan:#?}"
                );
            }
        }
    }
}
