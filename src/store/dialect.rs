//! What differs between the three databases, and nothing else: placeholders, quoting, casts, the
//! clock expression, upsert and update-from syntax, locking. The operations themselves are
//! written once, in `core`.

use crate::config::SqlIdent;

/// The database family behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (one file, one host).
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL 8.0+ or MariaDB 10.6+.
    MySql,
}

/// A statement rendered for one dialect: its text and, for each placeholder in text order, the
/// index of the argument it takes (a `?` takes the next argument each time it appears).
#[derive(Debug, Clone)]
pub struct Stmt {
    /// The SQL text.
    pub text: String,
    /// Argument index (0-based) of each bind, in bind order.
    pub binds: Vec<usize>,
}

impl Dialect {
    /// Renders a template written with `$1`, `$2`… into this dialect's placeholders.
    pub fn render(self, template: &str) -> Stmt {
        let mut text = String::with_capacity(template.len());
        let mut binds = Vec::new();
        let mut max = 0;
        let bytes = template.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'$' && i + 1 < bytes.len() && bytes[i + 1].is_ascii_digit() {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                let n: usize = template[start..end].parse().expect("digits");
                max = max.max(n);
                match self {
                    Dialect::Postgres => text.push_str(&template[i..end]),
                    // Plain `?` on SQLite too, not `?NNN`: sqlx looks up the name of every
                    // numbered parameter, and SQLite finds each name by a linear search, so
                    // binding a statement of n numbered parameters takes n² steps.
                    Dialect::Sqlite | Dialect::MySql => {
                        text.push('?');
                        binds.push(n - 1);
                    }
                }
                i = end;
            } else {
                let ch = template[i..].chars().next().expect("in bounds");
                text.push(ch);
                i += ch.len_utf8();
            }
        }
        if self == Dialect::Postgres {
            binds = (0..max).collect();
        }
        Stmt { text, binds }
    }

    /// An identifier, validated already, quoted for this dialect.
    pub fn quote(self, ident: &SqlIdent) -> String {
        let q = |s: &str| match self {
            Dialect::MySql => format!("`{s}`"),
            _ => format!("\"{s}\""),
        };
        match ident.schema() {
            Some(schema) => format!("{}.{}", q(schema), q(ident.name())),
            None => q(ident.name()),
        }
    }

    /// The database's clock as Unix milliseconds (the sweeper's own tables store time so).
    pub fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Dialect::Postgres => "CAST(extract(epoch FROM now()) * 1000 AS int8)",
            Dialect::MySql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        }
    }

    /// `expr` as text (a token or member of any type).
    pub fn text(self, expr: &str) -> String {
        match self {
            Dialect::Sqlite => format!("CAST({expr} AS TEXT)"),
            Dialect::Postgres => format!("CAST({expr} AS text)"),
            Dialect::MySql => format!("CAST({expr} AS CHAR)"),
        }
    }

    /// `expr` in a form that compares exactly, byte for byte (MySQL's collations fold case and
    /// pad with spaces; the others compare text exactly already).
    pub fn exact(self, expr: &str) -> String {
        match self {
            Dialect::MySql => format!("CAST({expr} AS BINARY)"),
            _ => self.text(expr),
        }
    }

    /// `expr` as bytes (text that may not be valid UTF-8, e.g. an unreadable source token).
    pub fn bytes(self, expr: &str) -> String {
        match self {
            Dialect::Sqlite => format!("CAST({expr} AS BLOB)"),
            Dialect::Postgres => format!("convert_to({expr}, 'UTF8')"),
            Dialect::MySql => format!("CAST({expr} AS BINARY)"),
        }
    }

    /// `expr` as a 64-bit integer (counts and flags decode the same everywhere).
    pub fn int(self, expr: &str) -> String {
        match self {
            Dialect::Sqlite => format!("CAST({expr} AS INTEGER)"),
            Dialect::Postgres => format!("CAST({expr} AS int8)"),
            Dialect::MySql => format!("CAST({expr} AS SIGNED)"),
        }
    }

    /// A 0/1 integer for a condition.
    pub fn flag(self, condition: &str) -> String {
        self.int(&format!("CASE WHEN {condition} THEN 1 ELSE 0 END"))
    }

    /// An upsert of the worker row that refreshes its heartbeat.
    pub fn upsert_heartbeat(self) -> &'static str {
        match self {
            Dialect::MySql => "ON DUPLICATE KEY UPDATE heartbeat_at = VALUES(heartbeat_at)",
            _ => "ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        }
    }

    /// `UPDATE table AS l SET … FROM derived AS u WHERE join AND filter`, in this dialect's
    /// syntax; `sets` are `(column, expression)` pairs, the expressions may use `l.` and `u.`.
    pub fn update_from(
        self,
        table: &str,
        sets: &[(&str, String)],
        derived: &str,
        join: &str,
        filter: &str,
    ) -> String {
        match self {
            Dialect::MySql => {
                let sets: Vec<String> = sets.iter().map(|(c, e)| format!("l.{c} = {e}")).collect();
                format!(
                    "UPDATE {table} AS l JOIN ({derived}) AS u ON {join} SET {} WHERE {filter}",
                    sets.join(", ")
                )
            }
            _ => {
                let sets: Vec<String> = sets.iter().map(|(c, e)| format!("{c} = {e}")).collect();
                format!(
                    "UPDATE {table} AS l SET {} FROM ({derived}) AS u WHERE {join} AND {filter}",
                    sets.join(", ")
                )
            }
        }
    }

    /// A locking read of rows about to be changed in the same transaction (SQLite's writes are
    /// serialised by `BEGIN IMMEDIATE` instead).
    pub fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            _ => " FOR UPDATE",
        }
    }

    /// How a read-only transaction that reads one snapshot throughout begins: what runs before
    /// it (if anything), its `BEGIN`, and the statement after which the snapshot is taken (if the
    /// `BEGIN` does not take it).
    pub fn snapshot(self) -> (Option<&'static str>, &'static str, Option<&'static str>) {
        match self {
            // A deferred transaction takes its WAL snapshot at its first read of the file.
            Dialect::Sqlite => (
                None,
                "BEGIN",
                Some("SELECT 1 FROM sweeper_sessions LIMIT 1"),
            ),
            // Repeatable read keeps the snapshot of its first statement.
            Dialect::Postgres => (
                None,
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                Some("SELECT 1"),
            ),
            // Taken at once, under repeatable read only (a server may default to another).
            Dialect::MySql => (
                Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
                "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
                None,
            ),
        }
    }

    /// How a write transaction starts: SQLite takes the write lock at once, so two processes
    /// never both read and then both write.
    pub fn begin_write(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => Some("BEGIN IMMEDIATE"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_dialect() {
        let t = "a = $1 AND b = $2 OR c = $1";
        assert_eq!(Dialect::Postgres.render(t).text, t);
        for d in [Dialect::Sqlite, Dialect::MySql] {
            let r = d.render(t);
            assert_eq!(r.text, "a = ? AND b = ? OR c = ?");
            assert_eq!(r.binds, [0, 1, 0]);
        }
        assert_eq!(Dialect::Postgres.render(t).binds, [0, 1]);
    }

    #[test]
    fn identifiers_are_quoted_per_dialect() {
        let id = SqlIdent::parse("shop.sessions", true).unwrap();
        assert_eq!(Dialect::MySql.quote(&id), "`shop`.`sessions`");
        assert_eq!(Dialect::Postgres.quote(&id), "\"shop\".\"sessions\"");
    }
}
