//! The `session-sweeper` binary: everything lives in the library; this only starts the runtime.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    session_sweeper::cli::main().await
}
