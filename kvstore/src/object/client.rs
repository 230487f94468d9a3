//! The object-store clients behind the tier: where a URL points, credentials, timeouts,
//! retries, and what a failure means.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::path::Path;

use super::ObjectTierConfig;
use crate::error::{Error, Result};

/// Why a request to the object store failed, as operators act on it (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The object is gone (deleted underneath, or never completed).
    NotFound,
    /// The store asked to slow down (503 SlowDown, 429) and retries ran out.
    Throttled,
    /// No connection (refused, reset, DNS, TLS).
    Unreachable,
    /// Credentials rejected or missing (401, 403).
    Credentials,
    /// The bytes came back but failed verification.
    Corrupt,
    /// The request outlived its deadline.
    Timeout,
    /// An object with that name already exists (a conditional put lost).
    Conflict,
    /// Anything else (the log line has the store's message).
    Other,
}

impl Failure {
    /// Every reason, in the order of [`Self::index`].
    pub const ALL: [Self; 8] = [
        Self::NotFound,
        Self::Throttled,
        Self::Unreachable,
        Self::Credentials,
        Self::Corrupt,
        Self::Timeout,
        Self::Conflict,
        Self::Other,
    ];

    /// A lowercase label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Throttled => "throttled",
            Self::Unreachable => "unreachable",
            Self::Credentials => "credentials",
            Self::Corrupt => "corrupt",
            Self::Timeout => "timeout",
            Self::Conflict => "conflict",
            Self::Other => "other",
        }
    }

    /// Position in [`Self::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the store as a whole is unusable (as opposed to one object or one request): a
    /// store that drops packets shows only as timeouts.
    pub const fn is_outage(self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::Credentials | Self::Throttled | Self::Timeout
        )
    }

    /// Classifies an error of the `object_store` crate. Its retry errors are private types, so
    /// statuses and connection failures are recognised by the text of the error chain — by the
    /// phrases around them ("status code: 503", `<Code>SlowDown`), never a bare number, which
    /// the request's URL or timing could contain.
    pub fn of(e: &object_store::Error) -> Self {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => return Self::NotFound,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => return Self::Credentials,
            E::AlreadyExists { .. } | E::Precondition { .. } => return Self::Conflict,
            _ => {}
        }
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        let text = text.to_ascii_lowercase();
        let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
        if has(&[
            "<code>slowdown</code>",
            "status code: 503",
            "status code: 429",
            "<code>throttling",
            "<code>requestlimitexceeded",
        ]) {
            Self::Throttled
        } else if has(&[
            "<code>signaturedoesnotmatch",
            "<code>invalidaccesskeyid",
            "<code>accessdenied",
            "<code>expiredtoken",
            "status code: 403",
            "status code: 401",
            "failed to get credentials",
        ]) {
            Self::Credentials
        } else if has(&["timed out", "deadline has elapsed"]) {
            Self::Timeout
        } else if has(&[
            "error sending request",
            "connection refused",
            "connection reset",
            "tcp connect",
            "dns error",
            "broken pipe",
        ]) {
            Self::Unreachable
        } else {
            Self::Other
        }
    }
}

/// Where the tier's objects go, parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// `s3://bucket/prefix`.
    S3 { bucket: String, prefix: String },
    /// `file:///dir/prefix`: a directory (tests, shared file systems).
    File { dir: String },
    /// `memory://prefix`: in-process, for tests.
    Memory { prefix: String },
}

impl Location {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidConfig {
            field: "object.url",
            reason: format!("{url:?}: {reason}"),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected s3://bucket/prefix, file:///dir or memory://"))?;
        let rest = rest.trim_end_matches('/');
        match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket"));
                }
                Ok(Self::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.to_owned(),
                })
            }
            "file" if rest.starts_with('/') => Ok(Self::File { dir: rest.to_owned() }),
            "file" => Err(bad("a file URL needs an absolute path (file:///dir)")),
            "memory" => Ok(Self::Memory {
                prefix: rest.to_owned(),
            }),
            _ => Err(bad("unknown scheme; expected s3, file or memory")),
        }
    }

    /// The key prefix every object of the tier goes under.
    pub(crate) fn prefix(&self) -> Path {
        match self {
            Self::S3 { prefix, .. } | Self::Memory { prefix } => Path::from(prefix.as_str()),
            Self::File { .. } => Path::default(),
        }
    }
}

/// Credentials for S3 from a shared credentials file (`~/.aws/credentials`, or
/// `AWS_SHARED_CREDENTIALS_FILE`), for `profile` (else `AWS_PROFILE`, else `default`).
/// `object_store` reads keys from the environment, web identity, container and instance
/// metadata, but not the profile files that the AWS CLI writes; this small reader covers them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ProfileCredentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: String,
    pub(crate) session_token: Option<String>,
    pub(crate) region: Option<String>,
}

impl ProfileCredentials {
    /// Reads `profile` from the credentials file and its region from the config file.
    pub(crate) fn load(profile: Option<&str>) -> Option<Self> {
        let env_profile = std::env::var("AWS_PROFILE").ok();
        let profile = profile.or(env_profile.as_deref()).unwrap_or("default");
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
        let file = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(std::path::PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
                .and_then(|p| std::fs::read_to_string(p).ok())
        };
        let creds = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")?;
        let mut out = Self::parse(&creds, profile)?;
        if let Some(config) = file("AWS_CONFIG_FILE", "config") {
            let section = if profile == "default" {
                "default".to_owned()
            } else {
                format!("profile {profile}")
            };
            out.region = ini_section(&config, &section).and_then(|kv| kv.get("region").cloned());
        }
        Some(out)
    }

    fn parse(text: &str, profile: &str) -> Option<Self> {
        let kv = ini_section(text, profile)?;
        Some(Self {
            access_key_id: kv.get("aws_access_key_id")?.clone(),
            secret_access_key: kv.get("aws_secret_access_key")?.clone(),
            session_token: kv.get("aws_session_token").cloned(),
            region: None,
        })
    }
}

/// The `key = value` pairs of `[section]` in an INI text.
fn ini_section(text: &str, section: &str) -> Option<std::collections::HashMap<String, String>> {
    let mut found = None;
    let mut current = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim() == section;
            if current {
                found.get_or_insert_with(std::collections::HashMap::new);
            }
            continue;
        }
        if let (true, Some((k, v))) = (current, line.split_once('=')) {
            found
                .get_or_insert_with(std::collections::HashMap::new)
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    found
}

/// Builds a client for `cfg`'s location. Reads and uploads use separate clients: reads must
/// give up within an inference request's deadline, uploads may retry for much longer.
pub(crate) fn build(
    cfg: &ObjectTierConfig,
    location: &Location,
    for_reads: bool,
) -> Result<Arc<dyn ObjectStore>> {
    match location {
        Location::Memory { .. } => Ok(Arc::new(object_store::memory::InMemory::new())),
        Location::File { dir } => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| {
                Error::InvalidConfig {
                    field: "object.url",
                    reason: e.to_string(),
                }
            })?;
            Ok(Arc::new(fs))
        }
        #[cfg(feature = "s3")]
        Location::S3 { bucket, .. } => s3(cfg, bucket, for_reads),
        #[cfg(not(feature = "s3"))]
        Location::S3 { .. } => {
            let _ = (cfg, for_reads);
            Err(Error::InvalidConfig {
                field: "object.url",
                reason: "this build has no S3 support (cargo feature `s3`)".into(),
            })
        }
    }
}

#[cfg(feature = "s3")]
fn s3(cfg: &ObjectTierConfig, bucket: &str, for_reads: bool) -> Result<Arc<dyn ObjectStore>> {
    use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};

    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoint = cfg
        .endpoint
        .clone()
        .filter(|e| !e.is_empty())
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    let allow_http = cfg
        .allow_http
        .or_else(|| env("AWS_ALLOW_HTTP").map(|v| v.eq_ignore_ascii_case("true") || v == "1"))
        .unwrap_or_else(|| endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    let (timeout, retry) = if for_reads {
        // One quick retry at most: a read that is slow is worth less than a recompute.
        let retries = cfg.max_retries.min(1);
        (
            cfg.read_timeout,
            RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: cfg.retry_backoff.min(Duration::from_millis(50)),
                    max_backoff: cfg.retry_backoff,
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: cfg.read_timeout,
            },
        )
    } else {
        (
            cfg.request_timeout,
            RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: cfg.retry_backoff,
                    max_backoff: cfg.retry_max_backoff,
                    base: 2.0,
                },
                max_retries: cfg.max_retries,
                retry_timeout: cfg.retry_timeout,
            },
        )
    };
    // Static keys (the configuration's, else a credentials profile's when the environment
    // names none) start from a builder that has read nothing from the environment: otherwise
    // an unrelated AWS_SESSION_TOKEN there would be sent along with them and refused.
    let profile = match &cfg.credentials {
        None if env("AWS_ACCESS_KEY_ID").is_none() => ProfileCredentials::load(cfg.profile.as_deref()),
        _ => None,
    };
    let static_keys = cfg.credentials.clone().or_else(|| {
        profile.as_ref().map(|p| super::ObjectCredentials {
            access_key_id: p.access_key_id.clone(),
            secret_access_key: p.secret_access_key.clone(),
            session_token: p.session_token.clone(),
        })
    });
    let builder = if static_keys.is_some() {
        AmazonS3Builder::new()
    } else {
        AmazonS3Builder::from_env()
    };
    let mut b = builder
        .with_bucket_name(bucket)
        .with_allow_http(allow_http)
        .with_virtual_hosted_style_request(cfg.virtual_hosted_style)
        .with_retry(retry)
        .with_conditional_put(if cfg.conditional_put {
            S3ConditionalPut::ETagMatch
        } else {
            S3ConditionalPut::Disabled
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(allow_http)
                .with_timeout(timeout)
                .with_connect_timeout(cfg.connect_timeout),
        );
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    // Region: the setting, the environment, the credentials profile, else us-east-1.
    let mut region = cfg
        .region
        .clone()
        .filter(|r| !r.is_empty())
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"));
    if let Some(c) = static_keys {
        b = b
            .with_access_key_id(c.access_key_id)
            .with_secret_access_key(c.secret_access_key);
        if let Some(t) = c.session_token.filter(|t| !t.is_empty()) {
            b = b.with_token(t);
        }
    }
    region = region.or_else(|| profile.and_then(|p| p.region));
    b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
    let s3 = b.build().map_err(|e| Error::InvalidConfig {
        field: "object",
        reason: e.to_string(),
    })?;
    Ok(Arc::new(s3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_locations() {
        assert_eq!(
            Location::parse("s3://b/p/q/").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            Location::parse("s3://b").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert!(Location::parse("s3:///p").is_err());
        assert!(Location::parse("file://rel").is_err());
        assert!(
            Location::parse("gs://b")
                .unwrap_err()
                .to_string()
                .contains("unknown scheme")
        );
        assert_eq!(Location::parse("memory://x").unwrap().prefix(), Path::from("x"));
    }

    #[test]
    fn profile_files_give_keys() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n[profile x]\n[x]\n# c\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=T\n";
        let d = ProfileCredentials::parse(text, "default").unwrap();
        assert_eq!(
            (d.access_key_id.as_str(), d.secret_access_key.as_str()),
            ("A", "B")
        );
        let x = ProfileCredentials::parse(text, "x").unwrap();
        assert_eq!(x.session_token.as_deref(), Some("T"));
        assert!(ProfileCredentials::parse(text, "y").is_none());
    }

    #[test]
    fn failures_are_classified_by_kind_and_text() {
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_owned().into(),
        };
        assert_eq!(
            Failure::of(&generic(
                "Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>"
            )),
            Failure::Throttled
        );
        // Numbers in a URL or a timing are not statuses.
        assert_eq!(
            Failure::of(&generic(
                "Error performing GET http://h/b/1503-429 in 4.03ms - operation timed out"
            )),
            Failure::Timeout
        );
        assert_eq!(
            Failure::of(&generic("error sending request for url")),
            Failure::Unreachable
        );
        assert_eq!(Failure::of(&generic("operation timed out")), Failure::Timeout);
        assert_eq!(Failure::of(&generic("weird")), Failure::Other);
        let nf = object_store::Error::NotFound {
            path: "p".into(),
            source: "gone".into(),
        };
        assert_eq!(Failure::of(&nf), Failure::NotFound);
        for (i, f) in Failure::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
    }
}
