//! The build stamp (`build.rs` sets it): the bottom of the module order, so that everything from
//! the metrics to the status page and the commands can name the running build.

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The short git commit the binary was built from, or "unknown" (see build.rs).
pub const COMMIT: &str = env!("SWEEPER_GIT_COMMIT");
/// The UTC build date, `YYYY-MM-DD` (see build.rs).
pub const BUILD_DATE: &str = env!("SWEEPER_BUILD_DATE");
/// What `--version` prints after the binary's name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SWEEPER_GIT_COMMIT"),
    ", built ",
    env!("SWEEPER_BUILD_DATE"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_carries_the_commit() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.contains(COMMIT));
        assert_eq!(BUILD_DATE.len(), 10);
    }
}
