//! The database's clock, as this process estimates it. Every lease and liveness decision is made
//! by the database itself (in SQL); this estimate only places idle cutoffs on the database's
//! timeline, so a replica whose own clock runs fast never finds a live session idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// Skew beyond which each heartbeat warns: leases stay safe, but logs and attempt times drift.
pub const SKEW_WARNING: chrono::Duration = chrono::Duration::seconds(1);

/// Local time plus the skew the last heartbeat measured; cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct DbClock {
    skew_ms: Arc<AtomicI64>,
}

impl DbClock {
    /// A clock that assumes no skew until the first observation.
    pub fn new() -> Self {
        Self::default()
    }

    /// The database's time now, as estimated.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew()
    }

    /// The last measured skew: database time minus local time.
    pub fn skew(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Takes a database timestamp read between `sent` and `received` (local times), assumes it
    /// was taken half-way, and returns the skew it implies.
    pub fn observe(
        &self,
        database: DateTime<Utc>,
        sent: DateTime<Utc>,
        received: DateTime<Utc>,
    ) -> chrono::Duration {
        let midpoint = sent + (received - sent) / 2;
        let skew = database - midpoint;
        self.skew_ms
            .store(skew.num_milliseconds(), Ordering::Relaxed);
        skew
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_measured_against_the_midpoint_of_the_round_trip() {
        let clock = DbClock::new();
        let sent = Utc::now();
        let received = sent + chrono::Duration::milliseconds(100);
        let db = sent + chrono::Duration::seconds(30) + chrono::Duration::milliseconds(50);
        assert_eq!(
            clock.observe(db, sent, received),
            chrono::Duration::seconds(30)
        );
        let est = clock.now() - Utc::now();
        assert!(
            (est - chrono::Duration::seconds(30))
                .num_milliseconds()
                .abs()
                < 50
        );
    }
}
