//! Settings from environment variables (12-factor). Every service reads its configuration through
//! [`Env`], so a missing or malformed variable fails at start-up with the variable's name in the
//! message instead of surfacing later as an obscure connection or parse error.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// A configuration problem, always naming the variable so an operator knows what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("environment variable {var} is required but not set{hint}")]
    Missing { var: String, hint: String },
    #[error("environment variable {var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
    #[error("environment variable {var} is not valid UTF-8")]
    NotUnicode { var: String },
}

/// The variables a service reads. Production takes them from the process; tests build one from
/// pairs so they never mutate the (shared, racy) process environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, OsString>,
}

impl Env {
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))))
    }

    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<OsString>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The raw value, if set. An empty value counts as unset: `FOO=` in a compose file or a Helm
    /// value left blank means "use the default", not "use the empty string".
    pub fn get(&self, var: &str) -> Result<Option<String>, ConfigError> {
        match self.vars.get(var) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => v
                .clone()
                .into_string()
                .map(Some)
                .map_err(|_| ConfigError::NotUnicode { var: var.into() }),
        }
    }

    /// A variable that must be set; `hint` says how to set it (may be empty).
    pub fn required(&self, var: &str, hint: &str) -> Result<String, ConfigError> {
        self.get(var)?.ok_or_else(|| ConfigError::Missing {
            var: var.into(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        })
    }

    /// A parsed optional variable. The value itself is not echoed in the error: it may be a secret.
    pub fn parse<T>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(var)?
            .map(|raw| {
                raw.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
                    var: var.into(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// A whole number within `range`, or `default` when unset.
    pub fn parse_in_range(
        &self,
        var: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let value = self.parse::<u64>(var)?.unwrap_or(default);
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Invalid {
                var: var.into(),
                reason: format!(
                    "{value} is out of range: expected {} to {}",
                    range.start(),
                    range.end()
                ),
            })
        }
    }
}

/// How to reach Postgres, shared by every service.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// Parsed at start so a typo in `DATABASE_URL` fails before any work is attempted.
    pub config: tokio_postgres::Config,
    /// Upper bound of pooled connections per process; each replica holds its own pool, so the sum
    /// over replicas must stay below the server's `max_connections`.
    pub pool_max_size: usize,
    /// Bounds both opening a connection and waiting for a free pooled one, so a dead database
    /// turns into an error instead of a hang.
    pub connect_timeout: Duration,
    /// `sslmode` and `sslrootcert` from the URL, and the TLS connector every connection uses.
    pub tls: crate::tls::Tls,
}

impl DatabaseSettings {
    pub const URL_VAR: &'static str = "DATABASE_URL";
    pub const POOL_MAX_SIZE_VAR: &'static str = "DATABASE_POOL_MAX_SIZE";
    pub const CONNECT_TIMEOUT_VAR: &'static str = "DATABASE_CONNECT_TIMEOUT_SECS";
    /// A file holding the password (a Docker or Kubernetes secret), for a URL without one.
    pub const PASSWORD_FILE_VAR: &'static str = "DATABASE_PASSWORD_FILE";
    /// libpq's variables for what the URL does not say (the Helm chart sets them, so the URL
    /// can stay in a Secret as the operator wrote it).
    pub const SSLMODE_VAR: &'static str = "PGSSLMODE";
    pub const SSLROOTCERT_VAR: &'static str = "PGSSLROOTCERT";

    /// Reads `DATABASE_URL` (required), `DATABASE_PASSWORD_FILE` (the password, for a URL
    /// without one), `DATABASE_POOL_MAX_SIZE` (1–1000, default: four per CPU, kept within
    /// 5–20) and `DATABASE_CONNECT_TIMEOUT_SECS` (1–300, default 5).
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let url = env.required(
            Self::URL_VAR,
            "e.g. postgres://user:password@localhost:5432/etl; `cargo xtask up` starts a local one",
        )?;
        let (mut config, tls) = Self::parse_url(
            &url,
            env.get(Self::SSLMODE_VAR)?,
            env.get(Self::SSLROOTCERT_VAR)?,
        )?;
        if let Some(path) = env.get(Self::PASSWORD_FILE_VAR)? {
            let invalid = |reason: String| ConfigError::Invalid {
                var: Self::PASSWORD_FILE_VAR.into(),
                reason,
            };
            if config.get_password().is_some() {
                return Err(invalid(
                    "DATABASE_URL has a password too: give it in one place".into(),
                ));
            }
            let password =
                std::fs::read(&path).map_err(|e| invalid(format!("cannot read {path}: {e}")))?;
            // Files written by `echo` or an editor end in a newline that is not the password's.
            let password = password.strip_suffix(b"\n").unwrap_or(&password);
            let password = password.strip_suffix(b"\r").unwrap_or(password);
            if password.is_empty() {
                return Err(invalid(format!("{path} is empty")));
            }
            config.password(password);
        }
        let pool_max_size = env.parse_in_range(
            Self::POOL_MAX_SIZE_VAR,
            1..=1000,
            default_pool_size() as u64,
        )? as usize;
        let connect_timeout =
            Duration::from_secs(env.parse_in_range(Self::CONNECT_TIMEOUT_VAR, 1..=300, 5)?);
        Ok(Self {
            config,
            pool_max_size,
            connect_timeout,
            tls,
        })
    }

    /// Settings for a URL with the defaults for everything else (tests and tools).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::from_env(&Env::from_pairs([(Self::URL_VAR, url)]))
    }

    /// The driver's config and the TLS settings: `sslmode` and `sslrootcert` from the URL, else
    /// from `PGSSLMODE` / `PGSSLROOTCERT`, else `prefer` and the system's CAs.
    fn parse_url(
        url: &str,
        env_mode: Option<String>,
        env_root_cert: Option<String>,
    ) -> Result<(tokio_postgres::Config, crate::tls::Tls), ConfigError> {
        use crate::tls::{split_url, SslMode, Tls};
        let invalid = |reason: String| ConfigError::Invalid {
            var: Self::URL_VAR.into(),
            reason,
        };
        let (rest, url_mode, url_root_cert) = split_url(url);
        let root_cert = url_root_cert.or(env_root_cert);
        let mut config = rest
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid(format!("not a Postgres connection string: {e}")))?;
        // A key=value string's own sslmode was parsed by the driver.
        let in_key_values = !rest.contains("://") && rest.contains("sslmode");
        let mode = match (url_mode, env_mode) {
            (Some(mode), _) => SslMode::parse(&mode).map_err(|e| invalid(e.to_string()))?,
            (None, Some(mode)) if !in_key_values => {
                SslMode::parse(&mode).map_err(|e| ConfigError::Invalid {
                    var: Self::SSLMODE_VAR.into(),
                    reason: e.to_string(),
                })?
            }
            (None, _) => match config.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer, // libpq's default
            },
        };
        config.ssl_mode(mode.driver_mode());
        let tls = Tls::new(mode, root_cert.map(Into::into)).map_err(|e| invalid(e.to_string()))?;
        Ok((config, tls))
    }
}

impl std::fmt::Debug for DatabaseSettings {
    // Hand-written so the password can never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("user", &self.config.get_user())
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("pool_max_size", &self.pool_max_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// deadpool's own default (four per CPU), kept within 5–20: enough for a burst of API requests
/// on a small machine, and few enough that several replicas fit under Postgres's default of 100.
fn default_pool_size() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 4).clamp(5, 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_may_come_from_a_file_but_not_from_two_places() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let file = file.to_str().unwrap();
        let settings = DatabaseSettings::from_env(&Env::from_pairs([
            ("DATABASE_URL", "postgres://etl@db/etl"),
            ("DATABASE_PASSWORD_FILE", file),
        ]))
        .unwrap();
        assert_eq!(settings.config.get_password(), Some(&b"s3cret"[..]));
        for (url, path) in [
            ("postgres://etl:other@db/etl", file),
            ("postgres://etl@db/etl", "/nonexistent/pw"),
        ] {
            let Err(err) = DatabaseSettings::from_env(&Env::from_pairs([
                ("DATABASE_URL", url),
                ("DATABASE_PASSWORD_FILE", path),
            ])) else {
                panic!("{url} with {path} was accepted");
            };
            assert!(err.to_string().contains("DATABASE_PASSWORD_FILE"), "{err}");
        }
    }

    #[test]
    fn sslmode_comes_from_the_url_else_from_pgsslmode_else_prefer() {
        use crate::tls::SslMode;
        let mode = |pairs: &[(&str, &str)]| {
            DatabaseSettings::from_env(&Env::from_pairs(pairs.iter().copied()))
                .unwrap()
                .tls
                .mode
        };
        let url = ("DATABASE_URL", "postgres://u@h/db");
        let url_require = ("DATABASE_URL", "postgres://u@h/db?sslmode=require");
        assert_eq!(mode(&[url]), SslMode::Prefer);
        assert_eq!(mode(&[url, ("PGSSLMODE", "disable")]), SslMode::Disable);
        assert_eq!(
            mode(&[url_require, ("PGSSLMODE", "disable")]),
            SslMode::Require
        );
        let err = DatabaseSettings::from_env(&Env::from_pairs([url, ("PGSSLMODE", "strict")]))
            .unwrap_err();
        assert!(err.to_string().contains("PGSSLMODE"), "{err}");
    }

    #[test]
    fn missing_database_url_names_the_variable() {
        let err = DatabaseSettings::from_env(&Env::default()).unwrap_err();
        assert!(matches!(&err, ConfigError::Missing { var, .. } if var == "DATABASE_URL"));
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn malformed_database_url_names_the_variable() {
        let err = DatabaseSettings::from_url("postgres://host:notaport/db").unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { var, .. } if var == "DATABASE_URL"));
    }

    #[test]
    fn pool_size_defaults_within_5_to_20_and_is_configurable() {
        let url = ("DATABASE_URL", "postgres://u@localhost/db");
        let default = DatabaseSettings::from_env(&Env::from_pairs([url])).unwrap();
        assert!(
            (5..=20).contains(&default.pool_max_size),
            "{}",
            default.pool_max_size
        );

        let set = Env::from_pairs([url, ("DATABASE_POOL_MAX_SIZE", "42")]);
        assert_eq!(DatabaseSettings::from_env(&set).unwrap().pool_max_size, 42);
    }

    #[test]
    fn malformed_pool_size_is_rejected_with_the_variable_name() {
        for bad in ["many", "0", "-3", "1001"] {
            let env = Env::from_pairs([
                ("DATABASE_URL", "postgres://u@localhost/db"),
                ("DATABASE_POOL_MAX_SIZE", bad),
            ]);
            let err = DatabaseSettings::from_env(&env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { var, .. } if var == "DATABASE_POOL_MAX_SIZE"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn an_empty_variable_means_unset() {
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://u@localhost/db"),
            ("DATABASE_CONNECT_TIMEOUT_SECS", ""),
        ]);
        let settings = DatabaseSettings::from_env(&env).unwrap();
        assert_eq!(settings.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let settings = DatabaseSettings::from_url("postgres://u:hunter2@localhost/db").unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
