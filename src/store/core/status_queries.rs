//! The status page's bounded queries: what [`crate::store::Store::status`] reads besides the
//! report. Each reads at most its `STATUS_*` limit of rows.

use chrono::{DateTime, Utc};

use super::{Arg, SqlStore, from_ms, int, opt_int, query, text};
use crate::store::{
    FailureGroup, MinuteCount, Op, PendingByDue, Result, STATUS_CALL_ROWS, STATUS_FAILURE_CODES,
    STATUS_WORKERS, WorkerStatus,
};

/// A day in milliseconds: how far back the status page's chart reads.
const DAY_MS: i64 = 86_400_000;

/// The database's clock and the attempt log's ends, as the status page reads them.
pub(super) struct CallEnds {
    /// The database's clock.
    pub now: DateTime<Utc>,
    /// When the newest call finished.
    pub last_call_at: Option<DateTime<Utc>>,
    /// Set when [`STATUS_CALL_ROWS`] cut the day short: the first call the chart covers.
    pub cover_from: Option<DateTime<Utc>>,
}

impl SqlStore {
    /// Calls per minute and class over the last day, from the newest [`STATUS_CALL_ROWS`]
    /// rows by primary key.
    pub(super) async fn calls_per_minute(&self) -> Result<Vec<MinuteCount>> {
        let d = self.dialect;
        let now = d.now_ms();
        let rows = query(
            &self.q(&format!(
                "SELECT {}, outcome, {} FROM sweeper_attempts \
                 WHERE id > (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - $1 \
                 AND finished_at >= {now} - {DAY_MS} GROUP BY 1, 2",
                d.int("finished_at - (finished_at % 60000)"),
                d.int("COUNT(*)")
            )),
            &[Arg::Int(STATUS_CALL_ROWS)],
        )
        .fetch_all(&self.pool)
        .await
        .op("counting calls per minute")?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(MinuteCount {
                    minute: from_ms(opt_int(r, 0)?),
                    class: text(r, 1)?,
                    count: int(r, 2) as u64,
                })
            })
            .collect())
    }

    /// The database's clock, the newest call, and where the row bound cut the day.
    pub(super) async fn call_ends(&self) -> Result<CallEnds> {
        let now = self.dialect.now_ms();
        let row = query(
            &self.q(&format!(
                "SELECT {now}, (SELECT finished_at FROM sweeper_attempts ORDER BY id DESC LIMIT 1), \
                 (SELECT finished_at FROM sweeper_attempts WHERE id <= \
                   (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - $1 \
                   AND finished_at >= {now} - {DAY_MS} ORDER BY id DESC LIMIT 1)"
            )),
            &[Arg::Int(STATUS_CALL_ROWS)],
        )
        .fetch_one(&self.pool)
        .await
        .op("reading the newest call")?;
        Ok(CallEnds {
            now: from_ms(int(&row, 0)),
            last_call_at: opt_int(&row, 1).map(from_ms),
            cover_from: opt_int(&row, 2).map(from_ms),
        })
    }

    /// Worker rows, newest heartbeat first, with the leases each holds.
    pub(super) async fn worker_statuses(&self) -> Result<Vec<WorkerStatus>> {
        let d = self.dialect;
        let rows = query(
            &self.q(&format!(
                "SELECT w.worker_id, w.hostname, {}, w.version, w.started_at, w.heartbeat_at, \
                 (SELECT {} FROM sweeper_sessions l WHERE l.lease_owner = w.worker_id) \
                 FROM sweeper_workers w ORDER BY w.heartbeat_at DESC LIMIT $1",
                d.int("w.pid"),
                d.int("COUNT(*)")
            )),
            &[Arg::Int(STATUS_WORKERS)],
        )
        .fetch_all(&self.pool)
        .await
        .op("listing workers")?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(WorkerStatus {
                    id: text(r, 0)?,
                    hostname: text(r, 1)?,
                    pid: opt_int(r, 2)? as u32,
                    version: text(r, 3)?,
                    started_at: from_ms(opt_int(r, 4)?),
                    heartbeat_at: from_ms(opt_int(r, 5)?),
                    leased: int(r, 6) as u64,
                })
            })
            .collect())
    }

    /// Failed sessions by last error code, most frequent first.
    pub(super) async fn failure_groups(&self) -> Result<Vec<FailureGroup>> {
        let d = self.dialect;
        let rows = query(
            &self.q(&format!(
                "SELECT last_error_code, {}, {}, MAX(settled_at) \
                 FROM sweeper_sessions WHERE state = 'failed' GROUP BY last_error_code \
                 ORDER BY COUNT(*) DESC, last_error_code LIMIT $1",
                d.text("MAX(last_error_message)"),
                d.int("COUNT(*)")
            )),
            &[Arg::Int(STATUS_FAILURE_CODES)],
        )
        .fetch_all(&self.pool)
        .await
        .op("grouping failures")?;
        Ok(rows
            .iter()
            .map(|r| FailureGroup {
                error_code: text(r, 0),
                error_message: text(r, 1),
                count: int(r, 2) as u64,
                last_failed_at: opt_int(r, 3).map(from_ms),
            })
            .collect())
    }

    /// Pending sessions counted by when their next attempt is due.
    pub(super) async fn pending_by_due(&self) -> Result<PendingByDue> {
        let d = self.dialect;
        let now = d.now_ms();
        let bucket = |lo: Option<i64>, hi: Option<i64>| {
            let cond = match (lo, hi) {
                (None, Some(hi)) => {
                    format!("(next_attempt_at IS NULL OR next_attempt_at <= {now} + {hi})")
                }
                (Some(lo), Some(hi)) => {
                    format!("next_attempt_at > {now} + {lo} AND next_attempt_at <= {now} + {hi}")
                }
                (Some(lo), None) => format!("next_attempt_at > {now} + {lo}"),
                (None, None) => "TRUE".into(),
            };
            d.int(&format!(
                "COALESCE(SUM(CASE WHEN {cond} THEN 1 ELSE 0 END), 0)"
            ))
        };
        let (m1, m5, m15, h1) = (60_000, 300_000, 900_000, 3_600_000);
        let due = sqlx::query(&format!(
            "SELECT {}, {}, {}, {}, {}, {} FROM sweeper_sessions WHERE state = 'pending'",
            bucket(None, Some(0)),
            bucket(Some(0), Some(m1)),
            bucket(Some(m1), Some(m5)),
            bucket(Some(m5), Some(m15)),
            bucket(Some(m15), Some(h1)),
            bucket(Some(h1), None),
        ))
        .fetch_one(&self.pool)
        .await
        .op("grouping pending sessions by due time")?;
        let n = |i: usize| int(&due, i) as u64;
        Ok(PendingByDue {
            now: n(0),
            within_1m: n(1),
            within_5m: n(2),
            within_15m: n(3),
            within_1h: n(4),
            later: n(5),
        })
    }
}
