//! What a packaged install needs besides sweeping: the build stamp (`--version`, the start-up
//! log line, `sweeper_build_info`), `completions` and `healthcheck`.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::build_info::VERSION;
use crate::config::redact_url;
use crate::output::say;

/// The address `healthcheck` asks when there is no config file at all.
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
    /// The URL to GET [default: /healthz on the config's server.listen; 127.0.0.1:9464 when
    /// there is no config file].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// Why `completions` or `healthcheck` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// `--url` is not a plain `http://` URL (bad usage: exit 2).
    #[error("--url {shown}: {why}")]
    BadUrl {
        /// The URL, its password redacted.
        shown: String,
        /// What is wrong with it.
        why: String,
    },
    /// There is no address to ask.
    #[error(transparent)]
    NoAddress(#[from] HealthAddrError),
    /// The host does not resolve.
    #[error("{shown}: resolving {host}: {source}")]
    Resolve {
        /// The URL, its password redacted.
        shown: String,
        /// The host asked for.
        host: String,
        /// The resolver's answer.
        source: std::io::Error,
    },
    /// The endpoint answered, but not 2xx.
    #[error("{shown}: HTTP {status}")]
    Unhealthy {
        /// The URL, its password redacted.
        shown: String,
        /// The status code.
        status: u16,
    },
    /// The endpoint did not answer (refused, timed out, not HTTP).
    #[error("{shown}: {source}")]
    Unreachable {
        /// The URL, its password redacted.
        shown: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The completion script could not be written.
    #[error("writing the script: {0}")]
    Write(#[source] std::io::Error),
}

impl ReleaseError {
    /// Whether the command line itself was wrong (exit 2) rather than the world (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, ReleaseError::BadUrl { .. })
    }
}

/// Writes the completion script of `command` for `shell` to stdout (a closed pipe, as with
/// `| head`, is fine).
pub fn completions(args: &CompletionsArgs, mut command: clap::Command) -> Result<(), ReleaseError> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "session-sweeper", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ReleaseError::Write(e)),
        _ => Ok(()),
    }
}

/// Why `healthcheck` has no address to ask: each is exit 1, a verdict the orchestrator can act
/// on, not a silent probe of some other port.
#[derive(Debug, thiserror::Error)]
pub enum HealthAddrError {
    /// The config file serves no `/healthz`.
    #[error(
        "server.listen is not set in {}: the daemon serves no /healthz; set it or pass --url",
        config.display()
    )]
    NotSet {
        /// The config file.
        config: PathBuf,
    },
    /// `SWEEPER_SERVER__LISTEN` is set, to nothing: no `/healthz` either.
    #[error("SWEEPER_SERVER__LISTEN is empty: the daemon serves no /healthz; set it or pass --url")]
    EmptyFromEnv,
    /// The listen address does not parse (the daemon would not start with it).
    #[error("{origin}: {value:?} is not an address like 127.0.0.1:9464; fix it or pass --url")]
    BadAddress {
        /// `server.listen in FILE` or `SWEEPER_SERVER__LISTEN`.
        origin: String,
        /// What it holds (an address: not a secret).
        value: String,
    },
    /// The config file exists but cannot be read.
    #[error("cannot read {}: {source}; pass --url", config.display())]
    Unreadable {
        /// The config file.
        config: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not TOML (the parser's excerpt of the line could hold a secret, so
    /// it is not repeated here).
    #[error(
        "{} is not valid TOML (`session-sweeper check` says where); pass --url",
        config.display()
    )]
    NotToml {
        /// The config file.
        config: PathBuf,
    },
}

/// GETs `/healthz` (or `--url`): Ok on a 2xx answer, a runtime failure (exit 1) otherwise. A
/// password in `--url` is never printed.
pub fn healthcheck(args: &HealthcheckArgs, config: &Path) -> Result<(), ReleaseError> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => format!(
            "http://{}/healthz",
            health_addr(config, std::env::var("SWEEPER_SERVER__LISTEN").ok())?
        ),
    };
    let shown = redact_url(&url);
    let (addr, host, path) = parse_http_url(&url, &shown)?;
    match get(addr, &host, &path) {
        Ok(status) if (200..300).contains(&status) => {
            say!("{shown}: {status}");
            Ok(())
        }
        Ok(status) => Err(ReleaseError::Unhealthy { shown, status }),
        Err(source) => Err(ReleaseError::Unreachable { shown, source }),
    }
}

/// The address to check: `SWEEPER_SERVER__LISTEN`, else `server.listen` from the config file
/// (read on its own, so a health check works whatever else the config needs). Only when there
/// is no config file at all is it [`DEFAULT_HEALTH_ADDR`]; a config without `server.listen`
/// serves no `/healthz`, and that is an error, not a probe of another port. A wildcard listen
/// address is checked on loopback.
fn health_addr(path: &Path, env_listen: Option<String>) -> Result<SocketAddr, HealthAddrError> {
    let (listen, origin) = match env_listen {
        Some(l) if l.trim().is_empty() => return Err(HealthAddrError::EmptyFromEnv),
        Some(l) => (l, "SWEEPER_SERVER__LISTEN".to_owned()),
        None => {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(DEFAULT_HEALTH_ADDR);
                }
                Err(source) => {
                    return Err(HealthAddrError::Unreadable {
                        config: path.to_owned(),
                        source,
                    });
                }
            };
            let table: toml::Table = text.parse().map_err(|_| HealthAddrError::NotToml {
                config: path.to_owned(),
            })?;
            let origin = format!("server.listen in {}", path.display());
            match table.get("server").and_then(|s| s.get("listen")) {
                Some(toml::Value::String(l)) if !l.trim().is_empty() => (l.clone(), origin),
                Some(toml::Value::String(_)) | None => {
                    return Err(HealthAddrError::NotSet {
                        config: path.to_owned(),
                    });
                }
                Some(other) => {
                    return Err(HealthAddrError::BadAddress {
                        origin,
                        value: other.to_string(),
                    });
                }
            }
        }
    };
    let mut addr =
        listen
            .trim()
            .parse::<SocketAddr>()
            .map_err(|_| HealthAddrError::BadAddress {
                origin,
                value: listen.clone(),
            })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// `http://host[:port][/path]` → the address, the Host header, the request target. Messages
/// show the URL as `shown` (its password redacted).
fn parse_http_url(raw: &str, shown: &str) -> Result<(SocketAddr, String, String), ReleaseError> {
    let usage = |why: &str| ReleaseError::BadUrl {
        shown: shown.to_owned(),
        why: why.to_owned(),
    };
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
        .map_err(|source| ReleaseError::Resolve {
            shown: shown.to_owned(),
            host: host.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ReleaseError::Resolve {
            shown: shown.to_owned(),
            host: host.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
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
        let parse = |u: &str| parse_http_url(u, u);
        let (addr, host, target) = parse("http://127.0.0.1:9464/healthz").unwrap();
        assert_eq!(addr, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(host, "127.0.0.1:9464");
        assert_eq!(target, "/healthz");
        let (addr, _, target) = parse("http://[::1]:80/readyz?x=1").unwrap();
        assert_eq!(addr, "[::1]:80".parse().unwrap());
        assert_eq!(target, "/readyz?x=1");
        assert!(matches!(
            parse("https://127.0.0.1/healthz"),
            Err(ReleaseError::BadUrl { .. })
        ));
        // The user information is never sent on, as a Host header or otherwise.
        let (_, host, _) = parse("http://u:pw@127.0.0.1:9464/healthz").unwrap();
        assert_eq!(host, "127.0.0.1:9464");
    }

    #[test]
    fn health_address_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sweeper.toml");
        let at = |listen: &str| {
            std::fs::write(&file, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
            health_addr(&file, None).map(|a| a.to_string())
        };
        assert_eq!(at("127.0.0.1:9500").unwrap(), "127.0.0.1:9500");
        assert_eq!(at("0.0.0.0:9501").unwrap(), "127.0.0.1:9501");
        assert_eq!(at("[::]:9502").unwrap(), "[::1]:9502");
        assert!(matches!(
            at("not an address"),
            Err(HealthAddrError::BadAddress { .. })
        ));
        assert!(matches!(at(" "), Err(HealthAddrError::NotSet { .. })));
        assert_eq!(
            health_addr(&file, Some("127.0.0.2:9600".into()))
                .unwrap()
                .to_string(),
            "127.0.0.2:9600"
        );
        assert!(matches!(
            health_addr(&file, Some(String::new())),
            Err(HealthAddrError::EmptyFromEnv)
        ));
        std::fs::write(&file, "[database]\nurl = \"sqlite://x.db\"\n").unwrap();
        let err = health_addr(&file, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "server.listen is not set in {}: the daemon serves no /healthz; set it or pass --url",
                file.display()
            )
        );
        std::fs::write(&file, "[server]\nlisten = 9464\n").unwrap();
        assert!(matches!(
            health_addr(&file, None),
            Err(HealthAddrError::BadAddress { .. })
        ));
        std::fs::write(&file, "[iyzico]\nsecret_key = \"hunter2\n").unwrap();
        let err = health_addr(&file, None).unwrap_err().to_string();
        assert!(
            err.contains("not valid TOML") && !err.contains("hunter2"),
            "{err}"
        );
        let absent = dir.path().join("absent.toml");
        assert_eq!(health_addr(&absent, None).unwrap(), DEFAULT_HEALTH_ADDR);
    }
}
