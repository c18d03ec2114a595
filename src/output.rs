//! What the commands print: the output formats and the `report` view, shared by `report` and
//! `demo`.

use crate::store::{Outcome, Report};

/// `println!` that stops quietly when stdout is closed (`dry-run | head`), where `println!`
/// panics: the work is done, only its listing has no reader left.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;

/// Output format of listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document for programs.
    Json,
}

/// Prints a report as a table or as the contract's JSON.
pub fn print_report(report: &Report, format: Format) {
    match format {
        Format::Json => say!("{}", report_json(report)),
        Format::Table => print_report_table(report),
    }
}

/// The contract's JSON document of a report: outcome counts at the top level.
fn report_json(report: &Report) -> String {
    let mut doc = serde_json::Map::new();
    for (outcome, n) in &report.counts {
        doc.insert(outcome.as_str().into(), (*n).into());
    }
    let value = |v: serde_json::Result<serde_json::Value>| v.expect("plain data serializes");
    doc.insert("pending_due_now".into(), report.pending.due_now.into());
    doc.insert(
        "pending_next_due".into(),
        value(serde_json::to_value(report.pending.next_due)),
    );
    doc.insert("leased".into(), report.leased.into());
    doc.insert("source_not_marked".into(), report.source_not_marked.into());
    doc.insert(
        "unusable_source_rows".into(),
        value(serde_json::to_value(report.unusable)),
    );
    doc.insert(
        "recent_failures".into(),
        value(serde_json::to_value(&report.recent_failures)),
    );
    serde_json::to_string_pretty(&doc).expect("plain data serializes")
}

fn print_report_table(report: &Report) {
    say!("{:<22} {:>10}", "OUTCOME", "SESSIONS");
    for (outcome, n) in &report.counts {
        say!("{:<22} {:>10}", outcome.as_str(), n);
    }
    print_backlog(report);
    print_unusable_rows(report);
    if !report.recent_failures.is_empty() {
        say!("\nrecent failures:");
        say!(
            "{:<10} {:<20} {:>8}  MESSAGE",
            "SESSION",
            "ERROR CODE",
            "ATTEMPTS"
        );
        for f in &report.recent_failures {
            say!(
                "{:<10} {:<20} {:>8}  {}",
                f.session,
                f.error_code.as_deref().unwrap_or("-"),
                f.attempts,
                f.error_message.as_deref().unwrap_or("")
            );
        }
    }
}

/// What is still to do: pending retries, leases held now, sources not yet marked.
fn print_backlog(report: &Report) {
    let pending = report
        .counts
        .iter()
        .find(|(o, _)| *o == Outcome::Pending)
        .map_or(0, |c| c.1);
    if pending > 0 {
        let next = report
            .pending
            .next_due
            .map_or("now".into(), |t| t.to_rfc3339());
        say!(
            "\npending: {} due now; next attempt due {next}",
            report.pending.due_now
        );
    }
    if report.leased > 0 {
        say!("leased right now: {}", report.leased);
    }
    if report.source_not_marked > 0 {
        say!(
            "invalidated, source row not marked passive yet (retried each sweep, never sent again): {}",
            report.source_not_marked
        );
    }
}

/// Active rows the sweeper will never touch, and why.
fn print_unusable_rows(report: &Report) {
    let u = report.unusable;
    if u.unreadable_last_activity > 0 {
        say!(
            "active rows never swept, last activity missing or not in source.last_activity_format: {}",
            u.unreadable_last_activity
        );
    }
    if u.bad_source_row > 0 {
        say!(
            "active rows never sent, token or member NULL or not text (bad_source_row): {}",
            u.bad_source_row
        );
    }
}
