//! How the S3 source reaches S3: its options, the SDK client built from them, and the chain's credentials, cached
//! here so that credentials S3 calls expired can be dropped and fetched anew.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{self as credentials, ProvideCredentials};

/// Static credentials for an S3-compatible store or a test server. Production jobs leave
/// [`S3Options::credentials`] empty and use the default chain (IRSA, instance role, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// A session token for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, even in debug output.
        f.debug_struct("S3Credentials").field("access_key_id", &"** redacted **").finish_non_exhaustive()
    }
}

/// How long and how often one S3 request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The backoff ceiling before the first retry; it doubles per retry (full jitter: the wait is random below it).
    pub initial_backoff: Duration,
    /// The largest backoff ceiling.
    pub max_backoff: Duration,
    /// No retry starts later than this after the request's first attempt.
    pub max_elapsed: Duration,
}

impl Default for S3RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
            max_elapsed: Duration::from_secs(300),
        }
    }
}

/// Settings for an [`S3`] source.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// An S3-compatible endpoint such as `http://127.0.0.1:9000` (`--s3-endpoint`); requests then use path-style
    /// addressing. `None`: AWS S3 (or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, which the SDK reads).
    pub endpoint: Option<String>,
    /// The region (`--s3-region`); `None`: the SDK's chain, else `us-east-1`.
    pub region: Option<String>,
    /// Static credentials instead of the default chain; for S3-compatible stores and tests.
    pub credentials: Option<S3Credentials>,
    /// The most GET/HEAD/LIST requests of this source in flight at once.
    pub max_in_flight: usize,
    /// Objects larger than this are read as parallel ranged GETs of this size.
    pub part_size: u64,
    /// Objects [`Source::read_many`] keeps in flight ahead of its consumer (memory: about this many objects).
    pub prefetch: usize,
    /// Keys per ListObjectsV2 page; `None` for S3's default (1000).
    pub list_page_size: Option<i32>,
    /// Retries of each request.
    pub retry: S3RetryPolicy,
    /// The limit on establishing a connection.
    pub connect_timeout: Duration,
    /// The limit on one attempt of a request, its body included (a part of [`S3Options::part_size`] or a listing
    /// page); an attempt past it counts as failed and is retried. This is what ends a stalled connection.
    pub request_timeout: Duration,
    /// Threads of the source's tokio runtime; 0 picks min(CPUs, 4).
    pub runtime_threads: usize,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            credentials: None,
            max_in_flight: 16,
            part_size: 8 << 20,
            prefetch: 8,
            list_page_size: None,
            retry: S3RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            runtime_threads: 0,
        }
    }
}

/// Credentials from the chain, cached here instead of in the SDK's identity cache, which cannot be told to drop
/// credentials that S3 rejected before their stated expiry.
#[derive(Debug, Clone)]
pub(super) struct Renewable(Arc<RenewableState>);

#[derive(Debug)]
struct RenewableState {
    chain: aws_sdk_s3::config::SharedCredentialsProvider,
    cached: tokio::sync::Mutex<Option<aws_sdk_s3::config::Credentials>>,
}

/// Credentials this close to their expiry are fetched anew (the SDK's identity cache uses the same margin).
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl Renewable {
    fn new(chain: aws_sdk_s3::config::SharedCredentialsProvider) -> Self {
        Self(Arc::new(RenewableState { chain, cached: tokio::sync::Mutex::new(None) }))
    }

    async fn current(&self) -> credentials::Result {
        // Held while the chain answers, so concurrent requests wait for one fetch instead of each starting one.
        let mut cached = self.0.cached.lock().await;
        let fresh =
            |c: &aws_sdk_s3::config::Credentials| c.expiry().is_none_or(|at| at > SystemTime::now() + EXPIRY_MARGIN);
        if let Some(c) = cached.as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        let c = self.0.chain.provide_credentials().await?;
        *cached = Some(c.clone());
        Ok(c)
    }

    /// Drops the cached credentials: the next request fetches new ones from the chain.
    pub(super) async fn renew(&self) {
        *self.0.cached.lock().await = None;
    }
}

impl ProvideCredentials for Renewable {
    fn provide_credentials<'a>(&'a self) -> credentials::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        credentials::future::ProvideCredentials::new(self.current())
    }
}

pub(super) async fn build_client(opts: &S3Options) -> (aws_sdk_s3::Client, String, Option<String>, Option<Renewable>) {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &opts.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(c) = &opts.credentials {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            c.session_token.clone(),
            None,
            "hytrain-static",
        ));
    }
    let sdk = loader.load().await;
    let region = sdk.region().cloned().unwrap_or_else(|| aws_config::Region::from_static("us-east-1"));
    let endpoint = opts.endpoint.clone().or_else(|| sdk.endpoint_url().map(str::to_owned));
    let credentials = sdk.credentials_provider().map(Renewable::new);
    let mut config = aws_sdk_s3::config::Builder::from(&sdk)
        .region(region.clone())
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        // The SDK's stalled-stream guard costs CPU on every body frame (a third of the client's CPU against the
        // local server); `request_timeout` bounds a stalled request instead, and the retry then reconnects.
        .stalled_stream_protection(aws_sdk_s3::config::StalledStreamProtectionConfig::disabled())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder().connect_timeout(opts.connect_timeout).build(),
        );
    if let Some(endpoint) = &endpoint {
        // S3-compatible stores rarely resolve bucket.host names; path-style works everywhere.
        config = config.endpoint_url(endpoint).force_path_style(true);
    }
    if let Some(credentials) = &credentials {
        config = config
            .credentials_provider(credentials.clone())
            .identity_cache(aws_sdk_s3::config::IdentityCache::no_cache());
    }
    let shown = endpoint.as_deref().map(strip_userinfo);
    (aws_sdk_s3::Client::from_conf(config.build()), region.to_string(), shown, credentials)
}

/// `scheme://user:pass@host/...` without `user:pass@`, so an endpoint can appear in messages.
pub(super) fn strip_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_userinfo_is_stripped_for_messages() {
        assert_eq!(strip_userinfo("http://user:pw@host:9000/path"), "http://host:9000/path");
        assert_eq!(strip_userinfo("https://s3.example.com"), "https://s3.example.com");
    }
}
