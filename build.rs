//! Stamps the build for `--version`, the start-up log line and `sweeper_build_info`:
//! `SWEEPER_GIT_COMMIT` (short commit hash) and `SWEEPER_BUILD_DATE` (UTC, `YYYY-MM-DD`).
//!
//! Never fails the build: without git (a source tarball, a container build whose context has no
//! `.git/`) the commit is "unknown". A commit given in the environment as `SWEEPER_GIT_COMMIT`
//! wins (the Dockerfile passes one in as a build argument), and `SOURCE_DATE_EPOCH` fixes the
//! date for reproducible builds. The date is that of the build script's last run: a new commit,
//! a changed build.rs or a clean build (every release and image build) runs it again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SWEEPER_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");

    let commit = std::env::var("SWEEPER_GIT_COMMIT")
        .ok()
        .filter(|c| is_commit(c))
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SWEEPER_GIT_COMMIT={commit}");

    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=SWEEPER_BUILD_DATE={}", date(epoch));

    // Re-stamp when HEAD moves (a commit, a checkout), without re-running on every source edit.
    for path in git_paths() {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn is_commit(s: &str) -> bool {
    (4..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn git_commit() -> Option<String> {
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| is_commit(c))
}

/// HEAD and the refs it may point to (a worktree keeps HEAD in its own git dir, the refs in the
/// common one).
fn git_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        paths.push(Path::new(&dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        let common = Path::new(&common);
        paths.push(common.join("packed-refs"));
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            paths.push(common.join(head_ref));
        }
    }
    paths
}

/// `YYYY-MM-DD` of a Unix time (UTC), by the days-from-civil inverse (no dependency).
fn date(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
