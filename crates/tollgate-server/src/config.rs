//! Server settings: the `[server]` section of the policy file, overridden by
//! command-line flags. Only secrets come from the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// The built-in default policy, used when no `--config` is given.
pub const DEFAULT_POLICY: &str = include_str!("default-policy.toml");

/// Default cap on open proxy connections ([`ServerConfig::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

/// The admin bearer token. Its `Debug` prints `***`.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; empty strings are refused (`None`).
    pub fn new(token: String) -> Option<AdminToken> {
        (!token.trim().is_empty()).then_some(AdminToken(token))
    }

    /// Constant-time comparison with a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        // Hash both sides so the comparison is constant-time whatever the lengths.
        let a = sha2::Sha256::digest(self.0.as_bytes());
        let b = sha2::Sha256::digest(presented.as_bytes());
        a.ct_eq(&b).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The secret that seeds counter-key hashing when replicas share a Redis
/// store (`TOLLGATE_STORE_SECRET`). Counter keys hash the scope values (API
/// key ids, IPs, file names) with a seed; with a public seed a caller who can
/// choose a scope value (a file name) could search for one whose key collides
/// with another caller's counter. Every replica must be given the same secret;
/// changing it starts every counter afresh.
#[derive(Clone)]
pub struct StoreSecret(String);

impl StoreSecret {
    /// A secret; empty strings are refused (`None`).
    pub fn new(secret: String) -> Option<StoreSecret> {
        (!secret.trim().is_empty()).then_some(StoreSecret(secret))
    }

    /// The 64-bit hashing seed derived from the secret (SHA-256).
    pub fn key_seed(&self) -> u64 {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(b"tollgate counter keys\0")
            .chain_update(self.0.as_bytes())
            .finalize();
        u64::from_le_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    }
}

impl std::fmt::Debug for StoreSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `[server]` as written in the policy file. Every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Proxy listener (default `127.0.0.1:8080`).
    pub listen: Option<SocketAddr>,
    /// Admin listener (default `127.0.0.1:8081`).
    pub admin_listen: Option<SocketAddr>,
    /// Upstream base URL, `http://` or `https://` (default: a built-in echo
    /// server).
    pub upstream: Option<String>,
    /// A PEM file of CA certificates trusted for an `https://` upstream
    /// besides the system's roots (default: none, system roots only).
    pub upstream_ca_file: Option<PathBuf>,
    /// Directory of the SQLite database (default `./tollgate-data`).
    pub data_dir: Option<PathBuf>,
    /// `postgres://…`, or an SQLite file path (default `DATA_DIR/tollgate.db`).
    pub database: Option<String>,
    /// Counter store: `memory` (default).
    pub store: Option<String>,
    /// Longest wait for the shared store per decision (default `50ms`).
    pub store_timeout: Option<String>,
    /// Most decisions waiting on the shared store at once (default 1024).
    pub store_max_in_flight: Option<usize>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDRs). Default none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Time to read a request's headers, and the longest a connection may sit
    /// idle (silent after connecting, or between keep-alive requests)
    /// (default `10s`).
    pub header_read_timeout: Option<String>,
    /// Time for a whole request (default `120s`).
    pub request_timeout: Option<String>,
    /// Longest pause between two pieces of a request body (default `10s`).
    pub body_read_timeout: Option<String>,
    /// Longest time to receive a whole request body (default `60s`).
    pub body_timeout: Option<String>,
    /// Longest a response write may stall because the client does not read
    /// (default `10s`).
    pub send_timeout: Option<String>,
    /// Most open connections on the proxy listener (default 8192); further
    /// connections are closed at once.
    pub max_connections: Option<usize>,
    /// Most live counters in memory (default 1,000,000).
    pub max_counters: Option<usize>,
    /// Runtime worker threads (default: `TOKIO_WORKER_THREADS` if set, else
    /// one per CPU the process may run on). Read by the `tollgate` binary,
    /// which builds the runtime.
    pub workers: Option<usize>,
    /// Largest body read to inspect it when an operation has no `max_body` (default `64MB`).
    pub inspect_body_max: Option<String>,
    /// How long a credit reservation lives if never settled (default `300s`;
    /// must exceed `request_timeout`).
    pub reservation_ttl: Option<String>,
    /// How long a completed `Idempotency-Key` is remembered: a retry with the
    /// same key within it replays the stored answer instead of charging again
    /// (default `24h`).
    pub idempotency_retention: Option<String>,
    /// `[server.webhooks]`: event delivery (see [`crate::webhooks`]). Default: none.
    pub webhooks: Option<crate::webhooks::WebhooksSection>,
    /// Invalid-key guard: failed API keys (unknown, revoked, malformed) one
    /// client address may present before it gets 429 without a lookup
    /// (default 100; `0` turns the guard off). See [`crate::guard`].
    pub auth_fail_limit: Option<u64>,
    /// Invalid-key guard: the budget refills `auth_fail_limit` failures per this
    /// window (default `1m`).
    pub auth_fail_window: Option<String>,
    /// Invalid-key guard: most client addresses tracked at once (default 100,000).
    pub auth_guard_max_ips: Option<usize>,
}

/// Resolved server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Upstream base URL (`http://` or `https://`); `None` starts the
    /// built-in echo upstream.
    pub upstream: Option<String>,
    /// CA certificates trusted for an `https://` upstream besides the
    /// system's roots (read from `upstream_ca_file`; default none).
    pub upstream_ca: Vec<CertificateDer<'static>>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Database URL or path; `None` = SQLite under `data_dir`.
    pub database: Option<String>,
    /// Counter store URL.
    pub store: String,
    /// Longest wait for the shared store per decision; past it the limit's
    /// `on_store_error` applies.
    pub store_timeout: Duration,
    /// Most decisions waiting on the shared store at once; more fail at once
    /// (kind `overloaded`) and follow `on_store_error`.
    pub store_max_in_flight: usize,
    /// Trusted proxies.
    pub trusted_proxies: Vec<IpNet>,
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// Longest pause between two pieces of a request body (408 beyond it).
    pub body_read_timeout: Duration,
    /// Longest time to receive a whole request body (408 beyond it).
    pub body_timeout: Duration,
    /// Longest a response write may stall (the connection is closed beyond it).
    pub send_timeout: Duration,
    /// Most open connections on the proxy listener.
    pub max_connections: usize,
    /// Live counter cap.
    pub max_counters: usize,
    /// Runtime worker threads; `None` = tokio's default (`TOKIO_WORKER_THREADS`,
    /// else one per CPU the process may run on).
    pub workers: Option<usize>,
    /// Inspection cap for bodies.
    pub inspect_body_max: u64,
    /// Admin token; `None` refuses every admin call.
    pub admin_token: Option<AdminToken>,
    /// Seeds counter-key hashing on a shared store (`TOLLGATE_STORE_SECRET`).
    pub store_secret: Option<StoreSecret>,
    /// The policy file, watched for reloads; `None` = built-in policy.
    pub policy_path: Option<PathBuf>,
    /// Lifetime of an unsettled credit reservation.
    pub reservation_ttl: Duration,
    /// How long completed idempotency records are kept.
    pub idempotency_retention: Duration,
    /// Webhook delivery.
    pub webhooks: crate::webhooks::WebhookSettings,
    /// Invalid-key guard: failures per address per window; 0 = off.
    pub auth_fail_limit: u64,
    /// Invalid-key guard: refill window.
    pub auth_fail_window: Duration,
    /// Invalid-key guard: most addresses tracked.
    pub auth_guard_max_ips: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            upstream: None,
            upstream_ca: Vec::new(),
            data_dir: PathBuf::from("tollgate-data"),
            database: None,
            store: "memory".to_owned(),
            store_timeout: tollgate_redis::DEFAULT_TIMEOUT,
            store_max_in_flight: tollgate_redis::DEFAULT_MAX_IN_FLIGHT,
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_counters: tollgate_core::store::memory::DEFAULT_MAX_COUNTERS,
            workers: None,
            inspect_body_max: 64_000_000,
            admin_token: None,
            store_secret: None,
            policy_path: None,
            reservation_ttl: Duration::from_secs(300),
            idempotency_retention: Duration::from_secs(24 * 3600),
            webhooks: crate::webhooks::WebhookSettings::default(),
            auth_fail_limit: 100,
            auth_fail_window: Duration::from_secs(60),
            auth_guard_max_ips: 100_000,
        }
    }
}

impl ServerConfig {
    /// Applies a `[server]` section over the defaults.
    ///
    /// # Errors
    /// A message per bad value.
    pub fn apply(&mut self, s: &ServerSection) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if let Some(v) = s.listen {
            self.listen = v;
        }
        if let Some(v) = s.admin_listen {
            self.admin_listen = v;
        }
        if let Some(v) = &s.upstream {
            match v.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => self.upstream = Some(v.clone()),
                _ => errors.push(format!("[server] upstream = \"{v}\" must be an http:// or https:// URL such as \"http://127.0.0.1:9000\" or \"https://api.example.com\"")),
            }
        }
        if let Some(path) = &s.upstream_ca_file {
            match read_ca_file(path) {
                Ok(roots) => self.upstream_ca = roots,
                Err(m) => errors.push(format!(
                    "[server] upstream_ca_file = \"{}\": {m}",
                    path.display()
                )),
            }
        }
        if let Some(v) = &s.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &s.database {
            self.database = Some(v.clone());
        }
        if let Some(v) = &s.store {
            if v == "memory" || v.starts_with("redis://") || v.starts_with("redis-cluster://") {
                self.store = v.clone();
            } else {
                errors.push(format!(
                    "[server] store = \"{v}\" must be \"memory\", \"redis://host:port/db\" or \"redis-cluster://host:port,host:port\""
                ));
            }
        }
        self.trusted_proxies.clear();
        for p in &s.trusted_proxies {
            match p
                .parse::<IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
            {
                Ok(n) => self.trusted_proxies.push(n),
                Err(_) => errors.push(format!(
                    "[server] trusted_proxies: \"{p}\" is not an IP address or CIDR"
                )),
            }
        }
        for (field, value, slot) in [
            (
                "header_read_timeout",
                &s.header_read_timeout,
                &mut self.header_read_timeout,
            ),
            (
                "request_timeout",
                &s.request_timeout,
                &mut self.request_timeout,
            ),
            ("store_timeout", &s.store_timeout, &mut self.store_timeout),
            (
                "reservation_ttl",
                &s.reservation_ttl,
                &mut self.reservation_ttl,
            ),
            (
                "body_read_timeout",
                &s.body_read_timeout,
                &mut self.body_read_timeout,
            ),
            ("body_timeout", &s.body_timeout, &mut self.body_timeout),
            (
                "idempotency_retention",
                &s.idempotency_retention,
                &mut self.idempotency_retention,
            ),
            ("send_timeout", &s.send_timeout, &mut self.send_timeout),
        ] {
            if let Some(v) = value {
                match humantime::parse_duration(v) {
                    Ok(d) if !d.is_zero() => *slot = d,
                    _ => errors.push(format!(
                        "[server] {field} = \"{v}\" is not a duration such as \"10s\""
                    )),
                }
            }
        }
        if let Some(v) = s.store_max_in_flight {
            self.store_max_in_flight = v.max(1);
        }
        match s.max_connections {
            Some(0) => errors.push(
                "[server] max_connections = 0 would refuse every connection; use a positive number such as 8192".to_owned(),
            ),
            Some(v) => self.max_connections = v,
            None => {}
        }
        if let Some(v) = s.max_counters {
            self.max_counters = v.max(1);
        }
        match s.workers {
            Some(0) => errors.push(
                "[server] workers = 0 would run nothing; use a positive number such as 1, or leave it out for one per CPU".to_owned(),
            ),
            Some(v) => self.workers = Some(v),
            None => {}
        }
        if let Some(v) = &s.inspect_body_max {
            match tollgate_core::policy::parse_size(v) {
                Some(n) => self.inspect_body_max = n,
                None => errors.push(format!(
                    "[server] inspect_body_max = \"{v}\" is not a size such as \"64MB\""
                )),
            }
        }
        if self.reservation_ttl <= self.request_timeout {
            errors.push(format!(
                "[server] reservation_ttl ({:?}) must exceed request_timeout ({:?}), or a slow request's credits expire before it is charged",
                self.reservation_ttl, self.request_timeout
            ));
        }
        if let Some(w) = &s.webhooks {
            match crate::webhooks::WebhookSettings::parse(w) {
                Ok(v) => self.webhooks = v,
                Err(mut e) => errors.append(&mut e),
            }
        }
        if let Some(v) = s.auth_fail_limit {
            self.auth_fail_limit = v;
        }
        if let Some(v) = &s.auth_fail_window {
            match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => self.auth_fail_window = d,
                _ => errors.push(format!(
                    "[server] auth_fail_window = \"{v}\" is not a duration such as \"1m\""
                )),
            }
        }
        if let Some(v) = s.auth_guard_max_ips {
            self.auth_guard_max_ips = v.max(1);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The database to open: the URL given, or the SQLite file under `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(d) => d.clone(),
            None => self.data_dir.join("tollgate.db").display().to_string(),
        }
    }
}

/// The CA certificates of a PEM file (one or more `CERTIFICATE` blocks),
/// each checked to be usable as a trust anchor.
///
/// # Errors
/// The file cannot be read, is not PEM, holds no certificate, or holds one
/// that cannot be parsed; the message (to follow the setting and its path)
/// says which and how to fix it.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    const BLOCKS: &str = "it must hold one or more \"-----BEGIN CERTIFICATE-----\" blocks";
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot be read ({e}); give a readable PEM file of CA certificates, or leave the setting out to trust the system's roots only"
        )
    })?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not a PEM certificate file ({e}); {BLOCKS}"))?;
    if roots.is_empty() {
        return Err(format!("holds no certificate; {BLOCKS}"));
    }
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    for (i, cert) in roots.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            format!(
                "certificate #{} cannot be used as a CA ({e}); {BLOCKS} of X.509 certificates",
                i + 1
            )
        })?;
    }
    Ok(roots)
}

/// Reads the `[server]` section of a policy file's text.
///
/// # Errors
/// The section does not parse (unknown field, wrong type).
pub fn server_section(src: &str) -> Result<ServerSection, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        server: Option<ServerSection>,
    }
    toml::from_str::<File>(src)
        .map(|f| f.server.unwrap_or_default())
        .map_err(|e| format!("[server]: {}", e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(server: &str) -> Result<ServerConfig, Vec<String>> {
        let section = server_section(&format!("[server]\n{server}\n")).expect("parses");
        let mut config = ServerConfig::default();
        config.apply(&section).map(|()| config)
    }

    #[test]
    fn store_secrets_give_distinct_stable_seeds() {
        let a = StoreSecret::new("first".into()).expect("non-empty");
        let b = StoreSecret::new("second".into()).expect("non-empty");
        assert_eq!(
            a.key_seed(),
            StoreSecret::new("first".into())
                .expect("non-empty")
                .key_seed()
        );
        assert_ne!(a.key_seed(), b.key_seed());
        assert_ne!(a.key_seed(), crate::store::SHARED_KEY_SEED);
        assert!(StoreSecret::new("  ".into()).is_none());
        assert_eq!(format!("{a:?}"), "***");
    }

    #[test]
    fn idempotency_retention_defaults_to_a_day_and_takes_durations() {
        assert_eq!(
            ServerConfig::default().idempotency_retention,
            Duration::from_secs(86_400)
        );
        let c = applied(r#"idempotency_retention = "7days""#).expect("valid");
        assert_eq!(c.idempotency_retention, Duration::from_secs(7 * 86_400));
        for bad in [r#""0s""#, r#""soon""#] {
            let errors = applied(&format!("idempotency_retention = {bad}")).expect_err(bad);
            assert!(
                errors[0].contains("idempotency_retention") && errors[0].contains("not a duration"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn upstream_is_http_or_https() {
        for ok in [
            "http://127.0.0.1:9000",
            "https://api.example.com",
            "https://[::1]:8443/v1",
        ] {
            let c = applied(&format!("upstream = \"{ok}\"")).expect(ok);
            assert_eq!(c.upstream.as_deref(), Some(ok));
        }
        for bad in ["ftp://files.example.com", "api.example.com", "https://"] {
            let errors = applied(&format!("upstream = \"{bad}\"")).expect_err(bad);
            assert!(
                errors[0].contains("must be an http:// or https:// URL such as"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn upstream_ca_file_is_read_at_load_and_its_problems_name_the_path() {
        let dir = tempfile::tempdir().expect("dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let cert = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.self_signed(&rcgen::KeyPair::generate().expect("key"))
                .expect("cert")
                .pem()
        };
        let two = write("two.pem", &format!("{}{}", cert("a"), cert("b")));
        let c = applied(&format!("upstream_ca_file = \"{}\"", two.display())).expect("valid");
        assert_eq!(c.upstream_ca.len(), 2);

        let not_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        for (path, why) in [
            (dir.path().join("missing.pem"), "cannot be read"),
            (
                write("empty.pem", "not a certificate"),
                "holds no certificate",
            ),
            (
                write("not-der.pem", not_der),
                "certificate #1 cannot be used as a CA",
            ),
        ] {
            let errors =
                applied(&format!("upstream_ca_file = \"{}\"", path.display())).expect_err(why);
            assert_eq!(errors.len(), 1, "{errors:?}");
            let prefix = format!("[server] upstream_ca_file = \"{}\": {why}", path.display());
            assert!(errors[0].starts_with(&prefix), "{errors:?}");
        }
    }

    #[test]
    fn workers_must_be_positive() {
        let section = |src: &str| server_section(src).expect("section");
        let mut c = ServerConfig::default();
        assert_eq!(c.workers, None, "default: tokio's own choice");
        c.apply(&section("[server]\nworkers = 2\n")).expect("valid");
        assert_eq!(c.workers, Some(2));
        let e = c
            .apply(&section("[server]\nworkers = 0\n"))
            .expect_err("0 refused");
        assert!(e[0].contains("workers = 0"), "{e:?}");
    }
}
