//! Connections kept by streams of back-to-back operations: the steps of start-up and of a
//! sweep up to its claims, the re-checks, the records, the source updates. sqlx's pool pings
//! a connection when it is taken and again when it is given back: two round trips per use,
//! more than the statements of a re-check themselves. And the ping on giving back runs in a
//! task of its own, so a step that follows at once finds no idle connection and opens one more
//! (milliseconds each, on the way to the first call). A lane keeps its connection between uses
//! instead, and gives it back to the pool once unused for [`LANE_IDLE`]. A lane is no lock:
//! whoever finds its connection taken gets one from the pool.
//!
//! A kept connection is not pinged, so it may have broken since its last use. Callers start
//! over on a fresh (pinged) connection when the first statement on a kept one fails, before
//! anything was written: what the ping on taking it would have done.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool};

use super::{StoreError, the_server_ended_the_session};

/// How long a lane keeps its connection after its last use.
pub(crate) const LANE_IDLE: Duration = Duration::from_millis(500);
/// Below this pool size no step holds a second connection (no lane keeps one, no two counts
/// run side by side): claims and heartbeats must always find one.
pub(crate) const MIN_POOL_FOR_LANES: u32 = 4;
/// From this pool size a sweep's two counts run beside its claims: a running sweep holds up to
/// [`MIN_POOL_FOR_LANES`] (the lanes of the steps, with the claims and heartbeats, of the
/// re-checks, of the records and of the source updates), and each count one more.
pub(crate) const MIN_POOL_TO_COUNT_BESIDE_A_SWEEP: u32 = MIN_POOL_FOR_LANES + 2;

/// A pooled connection one stream of operations keeps between uses.
pub(crate) struct Lane {
    state: Arc<Mutex<State>>,
    enabled: bool,
}

#[derive(Default)]
struct State {
    kept: Option<PoolConnection<Any>>,
    used: Option<Instant>,
    reaper: bool,
}

/// A connection taken from a lane.
pub(crate) struct LaneConn {
    /// The connection.
    pub conn: PoolConnection<Any>,
    /// Whether the pool just handed it out (and pinged it), rather than the lane keeping it.
    pub fresh: bool,
}

impl Lane {
    /// A lane that keeps connections when the pool has `max_connections` to spare.
    pub fn new(max_connections: u32) -> Self {
        Self {
            state: Arc::default(),
            enabled: max_connections >= MIN_POOL_FOR_LANES,
        }
    }

    /// The kept connection, if it was used within [`LANE_IDLE`], else one from the pool.
    pub async fn take(&self, pool: &AnyPool) -> Result<LaneConn, sqlx::Error> {
        let kept = {
            let mut state = self.state.lock().expect("lane lock");
            let recent = state.used.is_some_and(|u| u.elapsed() < LANE_IDLE);
            state.kept.take().filter(|_| recent)
        };
        match kept {
            Some(conn) => Ok(LaneConn { conn, fresh: false }),
            None => Self::fresh(pool).await,
        }
    }

    /// A connection from the pool, tested by its ping.
    pub async fn fresh(pool: &AnyPool) -> Result<LaneConn, sqlx::Error> {
        Ok(LaneConn {
            conn: pool.acquire().await?,
            fresh: true,
        })
    }

    /// Keeps `conn` for the next use (only after a use that succeeded: a connection whose
    /// operation failed or was cut short goes back to the pool, which tests and cleans it).
    pub fn keep(&self, conn: PoolConnection<Any>) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.lock().expect("lane lock");
        if state.kept.is_some() {
            return;
        }
        state.kept = Some(conn);
        state.used = Some(Instant::now());
        if !state.reaper {
            state.reaper = true;
            tokio::spawn(reap(Arc::downgrade(&self.state)));
        }
    }

    /// Takes the kept connection out of the lane (to be closed with the pool).
    pub fn take_kept(&self) -> Option<PoolConnection<Any>> {
        self.state.lock().expect("lane lock").kept.take()
    }
}

/// Gives the kept connection back once it has been unused for [`LANE_IDLE`].
async fn reap(state: std::sync::Weak<Mutex<State>>) {
    loop {
        tokio::time::sleep(LANE_IDLE).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let idle = {
            let mut s = state.lock().expect("lane lock");
            if s.used.is_some_and(|u| u.elapsed() < LANE_IDLE) {
                continue;
            }
            s.reaper = false;
            s.kept.take()
        };
        drop(idle);
        return;
    }
}

/// Where a lane's work failed: at its first statement (nothing was written yet, and a kept
/// connection may simply have broken since its last use) or later.
pub(crate) enum Failed {
    First(StoreError),
    Later(StoreError),
}

impl Failed {
    /// The error, wherever it came.
    pub(crate) fn error(self) -> StoreError {
        match self {
            Failed::First(e) | Failed::Later(e) => e,
        }
    }
}

/// Whether a failed first statement on a kept connection says nothing about the statement: a
/// connection that broke, or a session the server ended since its last use (it says so in an
/// error of its own before it hangs up), not an answer to the statement.
pub(crate) fn connection_failed(e: &StoreError) -> bool {
    match e {
        StoreError::Database {
            source: source @ sqlx::Error::Database(_),
            ..
        } => the_server_ended_the_session(source),
        _ => true,
    }
}

/// Runs `$work` (an expression over the connection `$conn`, yielding `Result<_, Failed>`) on
/// `$lane`'s connection; when its first statement failed on a kept connection, once more on a
/// fresh one, as the pool's ping on taking it would have. The connection is kept only after a
/// success.
macro_rules! on_lane {
    ($store:expr, $lane:expr, $op:expr, |$conn:ident| $work:expr) => {{
        use $crate::store::Op as _;
        use $crate::store::lane::{Lane, connection_failed};
        let mut taken = $lane.take(&$store.pool).await.op($op)?;
        let result = {
            let $conn: &mut sqlx::AnyConnection = &mut taken.conn;
            $work
        };
        let result = match result {
            Err($crate::store::lane::Failed::First(e)) if !taken.fresh && connection_failed(&e) => {
                taken.conn.close_on_drop();
                taken = Lane::fresh(&$store.pool).await.op($op)?;
                let $conn: &mut sqlx::AnyConnection = &mut taken.conn;
                $work
            }
            other => other,
        };
        match result {
            Ok(v) => {
                $lane.keep(taken.conn);
                Ok(v)
            }
            Err(f) => Err(f.error()),
        }
    }};
}
pub(crate) use on_lane;
