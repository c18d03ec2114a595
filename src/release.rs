//! What a packaged install needs besides sweeping: the build stamp (`--version`, the start-up
//! log line, `sweeper_build_info`), `completions` and `healthcheck`.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::time::Duration;

use clap::CommandFactory as _;

use crate::cli::{Cli, CliError};

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

/// The metrics port when the config names none.
pub const DEFAULT_HEALTH_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Options of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of `healthcheck`.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// The URL to GET [default: /healthz on the config's server.listen, else 127.0.0.1:9464].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// Writes the completion script for `shell` to stdout (a closed pipe, as with `| head`, is fine).
pub fn completions(args: &CompletionsArgs) -> Result<(), CliError> {
    let mut script = Vec::new();
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "session-sweeper",
        &mut script,
    );
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Runtime(
            anyhow::anyhow!("writing the script: {e}"),
        )),
        _ => Ok(()),
    }
}

/// GETs `/healthz` (or `--url`): Ok on a 2xx answer, a runtime failure (exit 1) otherwise.
pub fn healthcheck(args: &HealthcheckArgs, config: Option<&Path>) -> Result<(), CliError> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => format!(
            "http://{}/healthz",
            health_addr(config, std::env::var("SWEEPER_SERVER__LISTEN").ok())
        ),
    };
    let (addr, host, path) = parse_http_url(&url)?;
    match get(addr, &host, &path) {
        Ok(status) if (200..300).contains(&status) => {
            println!("{url}: {status}");
            Ok(())
        }
        Ok(status) => Err(CliError::Runtime(anyhow::anyhow!("{url}: HTTP {status}"))),
        Err(e) => Err(CliError::Runtime(anyhow::anyhow!("{url}: {e}"))),
    }
}

/// The address to check: `SWEEPER_SERVER__LISTEN`, else `server.listen` from the config file
/// (read on its own, so a health check works whatever else the config needs), else the default.
/// A wildcard listen address is checked on loopback.
fn health_addr(config: Option<&Path>, env_listen: Option<String>) -> SocketAddr {
    let from_file = || {
        let path = config.unwrap_or(Path::new(crate::cli::DEFAULT_CONFIG));
        let text = std::fs::read_to_string(path).ok()?;
        let table: toml::Table = text.parse().ok()?;
        Some(table.get("server")?.get("listen")?.as_str()?.to_owned())
    };
    let listen = env_listen.or_else(from_file);
    let Some(mut addr) = listen.and_then(|l| l.trim().parse::<SocketAddr>().ok()) else {
        return DEFAULT_HEALTH_ADDR;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

/// `http://host[:port][/path]` → the address, the Host header, the request target.
fn parse_http_url(raw: &str) -> Result<(SocketAddr, String, String), CliError> {
    let usage = |why: &str| CliError::Usage(format!("--url {raw}: {why}"));
    let url = url::Url::parse(raw).map_err(|e| usage(&e.to_string()))?;
    if url.scheme() != "http" {
        return Err(usage(
            "only http:// is supported (the metrics port serves plain HTTP)",
        ));
    }
    let host = url.host_str().ok_or_else(|| usage("no host"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| CliError::Runtime(anyhow::anyhow!("{raw}: resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| CliError::Runtime(anyhow::anyhow!("{raw}: {host} has no address")))?;
    let mut target = url.path().to_owned();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    Ok((addr, host_header, target))
}

/// One HTTP/1.1 GET with a short timeout; the status code of the answer.
fn get(addr: SocketAddr, host: &str, target: &str) -> std::io::Result<u16> {
    // One deadline for the whole exchange: a server that drips a byte at a time must not keep
    // the check alive past it.
    let deadline = std::time::Instant::now() + HEALTH_TIMEOUT;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))
    };
    let mut stream = TcpStream::connect_timeout(&addr, HEALTH_TIMEOUT)?;
    stream.set_write_timeout(Some(left()?))?;
    // One write: a server that answers after its first read sees the whole request.
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: session-sweeper-healthcheck/{VERSION}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(v), Some(status)) if v.starts_with("HTTP/") => Ok(status),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        let (addr, host, target) = parse_http_url("http://127.0.0.1:9464/healthz").unwrap();
        assert_eq!(addr, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(host, "127.0.0.1:9464");
        assert_eq!(target, "/healthz");
        let (addr, _, target) = parse_http_url("http://[::1]:80/readyz?x=1").unwrap();
        assert_eq!(addr, "[::1]:80".parse().unwrap());
        assert_eq!(target, "/readyz?x=1");
        assert!(matches!(
            parse_http_url("https://127.0.0.1/healthz"),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn health_address_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sweeper.toml");
        let at = |listen: &str| {
            std::fs::write(&file, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
            health_addr(Some(&file), None).to_string()
        };
        assert_eq!(at("127.0.0.1:9500"), "127.0.0.1:9500");
        assert_eq!(at("0.0.0.0:9501"), "127.0.0.1:9501");
        assert_eq!(at("[::]:9502"), "[::1]:9502");
        assert_eq!(at("not an address"), "127.0.0.1:9464");
        assert_eq!(
            health_addr(Some(&file), Some("127.0.0.2:9600".into())).to_string(),
            "127.0.0.2:9600"
        );
        let absent = dir.path().join("absent.toml");
        assert_eq!(health_addr(Some(&absent), None), DEFAULT_HEALTH_ADDR);
    }

    #[test]
    fn version_carries_the_commit() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.contains(COMMIT));
        assert_eq!(BUILD_DATE.len(), 10);
    }
}
