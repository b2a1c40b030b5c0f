//! `s3://bucket/prefix`: objects straight from S3, or from an S3-compatible store through an endpoint override.
//!
//! Credentials come from the SDK's default chain: environment variables, a web identity token (IRSA on EKS),
//! the ECS container or EC2 instance role (SageMaker's execution role), profiles. When S3 answers a request with
//! `ExpiredToken` (a session revoked or ended before the expiry its credentials carry), the credentials are fetched
//! anew from the chain and the request is retried once. The region comes from
//! [`S3Options::region`], else the SDK's chain (`AWS_REGION`, profile, instance metadata), else `us-east-1`.
//!
//! Reads of objects larger than [`S3Options::part_size`] are split into ranged GETs run in parallel; at most
//! [`S3Options::max_in_flight`] requests of this source are in flight at once. Each request is retried on its own
//! (throttling such as `503 SlowDown`, other 5xx, connection errors, timeouts, bodies shorter than their
//! `Content-Length`) with exponential backoff and full jitter within [`S3RetryPolicy`]; the SDK's own retries are
//! off so that one budget governs. The [`Source`] trait is synchronous: the source owns a small multi-thread tokio
//! runtime and waits on it, which works from plain threads and from inside another runtime alike.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use tokio::sync::Semaphore;

use super::{check_name, Object, Objects, ReadBudget, Source};
use crate::Error;

mod client;
mod prefetch;
mod write;

use client::{build_client, Renewable};
pub use client::{S3Credentials, S3Options, S3RetryPolicy};
use prefetch::Prefetch;

/// An S3 prefix as a [`Source`]. See the module documentation for credentials, regions, parallelism and retries.
///
/// `s3://bucket/prefix` lists the keys below `prefix/` and names each by the rest of its key, exactly as a copy of
/// the prefix in a folder names its files. When nothing lies below `prefix/` but an object named `prefix` exists,
/// the source holds that one object (as [`super::Dir`] does for a file).
pub struct S3 {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3").field("location", &self.inner.location).field("opts", &self.inner.opts).finish()
    }
}

struct Inner {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The prefix as given (without a leading `/`).
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    location: String,
    region: String,
    /// Where the requests go when not to AWS, without any user:password part.
    endpoint: Option<String>,
    opts: S3Options,
    permits: Semaphore,
    /// Key of an object = `base` + its name. `prefix/` normally; the prefix's parent when it names one object.
    base: Mutex<String>,
    /// Sizes seen by `list`, so reads need no HEAD.
    sizes: Mutex<HashMap<String, u64>>,
    /// The credentials requests are signed with, renewable.
    credentials: Option<Renewable>,
}

/// How one attempt of a request failed.
enum Failure {
    /// Worth another attempt: throttling, 5xx, connection trouble, a short body.
    Retry(String),
    /// S3 called the credentials expired: worth one attempt with renewed ones (the error if that fails too).
    Expired(Error),
    /// Final.
    Fatal(Error),
}

impl S3 {
    /// A source for `url` (`s3://bucket` or `s3://bucket/prefix`). Builds the client (resolving the region) but
    /// sends no request to S3 yet.
    pub fn new(url: &str, opts: &S3Options) -> Result<Self, Error> {
        let spec_error = |reason: &str| Error::Spec { spec: url.to_owned(), reason: reason.to_owned() };
        let rest = url.strip_prefix("s3://").ok_or_else(|| spec_error("expected s3://bucket/prefix"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(spec_error("no bucket; expected s3://bucket/prefix"));
        }
        if opts.max_in_flight == 0 || opts.part_size == 0 || opts.prefetch == 0 || opts.retry.max_attempts == 0 {
            return Err(spec_error("S3 max in flight, part size, prefetch and retry attempts must be at least 1"));
        }
        let threads = match opts.runtime_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4),
            n => n,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("hytrain-s3")
            .enable_all()
            .build()
            .map_err(|io| Error::S3 {
                location: url.to_owned(),
                op: "start".into(),
                detail: format!("cannot start the S3 I/O threads: {io}"),
            })?;
        let handle = runtime.handle().clone();
        // Not block_on: that panics when S3::new is called from inside another runtime.
        let (tx, rx) = mpsc::sync_channel(1);
        let owned = opts.clone();
        handle.spawn(async move {
            let _ = tx.send(build_client(&owned).await);
        });
        let (client, region, endpoint, credentials) = rx.recv().map_err(|_| Error::S3 {
            location: url.to_owned(),
            op: "start".into(),
            detail: "setting up the S3 client failed unexpectedly; this is a bug in hytrain-data".into(),
        })?;
        let prefix = prefix.trim_start_matches('/').to_owned();
        let base = if prefix.is_empty() || prefix.ends_with('/') { prefix.clone() } else { format!("{prefix}/") };
        let inner = Inner {
            client,
            location: format!("s3://{bucket}/{prefix}"),
            bucket: bucket.to_owned(),
            prefix,
            region,
            endpoint,
            permits: Semaphore::new(opts.max_in_flight),
            opts: opts.clone(),
            base: Mutex::new(base),
            sizes: Mutex::default(),
            credentials,
        };
        Ok(Self { inner: Arc::new(inner), runtime: Some(runtime), handle })
    }

    /// Runs `fut` on the source's runtime and waits for it. Unlike `block_on` this also works when the caller is
    /// itself inside a tokio runtime.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = Result<T, Error>> + Send + 'static) -> Result<T, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| Err(self.inner.bug("a read task ended without an answer")))
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime; shut down in the background instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A random number for jitter; std's hasher keys are random per instance.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    hasher.finish()
}

impl Inner {
    fn key_of(&self, name: &str) -> String {
        format!("{}{name}", self.base.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn object_location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn bug(&self, what: &str) -> Error {
        Error::S3 {
            location: self.location.clone(),
            op: "read".into(),
            detail: format!("{what}; this is a bug in hytrain-data, please report it"),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retry budget is spent.
    async fn retry<T, F, Fut>(&self, op: &str, location: &str, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let policy = &self.opts.retry;
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut renewed = false;
        loop {
            attempts += 1;
            let result = {
                let _permit = self.permits.acquire().await.map_err(|_| self.bug("request permits closed"))?;
                match tokio::time::timeout(self.opts.request_timeout, attempt()).await {
                    Ok(result) => result,
                    Err(_) => Err(Failure::Retry(format!(
                        "no complete answer within {} s",
                        self.opts.request_timeout.as_secs_f64()
                    ))),
                }
            };
            let reason = match result {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(err)) => return Err(err),
                Err(Failure::Expired(err)) if renewed => {
                    return Err(match err {
                        Error::AccessDenied { location, code, message } => Error::AccessDenied {
                            location,
                            code,
                            message: format!("{message} (refused again after the credentials were renewed)"),
                        },
                        other => other,
                    })
                }
                Err(Failure::Expired(_)) => {
                    renewed = true;
                    tracing::warn!(
                        op,
                        location,
                        "S3 says the credentials expired; renewing them from the credential chain and retrying once"
                    );
                    if let Some(credentials) = &self.credentials {
                        credentials.renew().await;
                    }
                    continue;
                }
                Err(Failure::Retry(reason)) => reason,
            };
            let exponent = attempts.saturating_sub(1).min(30);
            let ceiling = policy.initial_backoff.saturating_mul(1 << exponent).min(policy.max_backoff);
            let wait = Duration::from_nanos(random() % (ceiling.as_nanos() as u64).max(1));
            if attempts >= policy.max_attempts || started.elapsed() + wait > policy.max_elapsed {
                return Err(Error::RetriesExhausted {
                    location: location.to_owned(),
                    op: op.to_owned(),
                    attempts,
                    seconds: started.elapsed().as_secs_f64(),
                    last: reason,
                });
            }
            tracing::warn!(op, location, attempt = attempts, error = %reason, "S3 request failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Sorts an SDK error into retry-worthy and final ones, with a message that says what to do.
    fn classify<E>(&self, op: &str, location: &str, err: SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let fatal =
            |detail: String| Failure::Fatal(Error::S3 { location: location.to_owned(), op: op.to_owned(), detail });
        match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or("").to_owned();
                let message = ctx.err().message().unwrap_or("").to_owned();
                let said = if code.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status} {code}") };
                let said = if message.is_empty() { said } else { format!("{said}: {message}") };
                match (status, code.as_str()) {
                    (_, "NoSuchBucket") => Failure::Fatal(Error::NoSuchBucket {
                        bucket: self.bucket.clone(),
                        region: self.region.clone(),
                    }),
                    (_, "ExpiredToken" | "TokenRefreshRequired") => {
                        Failure::Expired(Error::AccessDenied {
                            location: location.to_owned(),
                            code,
                            message: if message.is_empty() {
                                "the credentials expired".into()
                            } else {
                                message
                            },
                        })
                    }
                    (
                        _,
                        "AccessDenied"
                        | "InvalidAccessKeyId"
                        | "SignatureDoesNotMatch"
                        | "InvalidToken"
                        | "AllAccessDisabled"
                        | "AccountProblem",
                    )
                    | (403, _) => Failure::Fatal(Error::AccessDenied {
                        location: location.to_owned(),
                        code: if code.is_empty() {
                            "HTTP 403".into()
                        } else {
                            code
                        },
                        message: if message.is_empty() {
                            "forbidden".into()
                        } else {
                            message
                        },
                    }),
                    (
                        301 | 307 | 400,
                        "PermanentRedirect"
                        | "AuthorizationHeaderMalformed"
                        | "IllegalLocationConstraintException",
                    )
                    | (301, _) => {
                        let region = ctx
                            .raw()
                            .headers()
                            .get("x-amz-bucket-region")
                            .unwrap_or("another region");
                        fatal(format!(
                            "{said}; the bucket is in {region}, not {}: set --s3-region {region} (or AWS_REGION)",
                            self.region
                        ))
                    }
                    (429 | 500..=599, _)
                    | (
                        _,
                        "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        // An upload's body arrived other than it was sent (its checksum does not match).
                        | "BadDigest"
                        | "XAmzContentSHA256Mismatch",
                    ) => Failure::Retry(said),
                    _ => fatal(said),
                }
            }
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                Failure::Retry(DisplayErrorContext(&err).to_string())
            }
            SdkError::DispatchFailure(failure) if !failure.is_user() => {
                let to = self.endpoint.as_deref().unwrap_or("S3");
                Failure::Retry(format!("connection to {to} failed: {}", DisplayErrorContext(&err)))
            }
            _ => {
                let text = DisplayErrorContext(&err).to_string();
                if text.contains("credential") || text.contains("identity") {
                    fatal(format!(
                        "no usable AWS credentials ({text}); on EKS give the pod's service account an IAM role \
                         (IRSA), on SageMaker check the execution role, elsewhere set AWS_PROFILE or AWS_ACCESS_KEY_ID"
                    ))
                } else {
                    fatal(text)
                }
            }
        }
    }

    async fn list(self: Arc<Self>) -> Result<Vec<Object>, Error> {
        let dir_base = if self.prefix.is_empty() || self.prefix.ends_with('/') {
            self.prefix.clone()
        } else {
            format!("{}/", self.prefix)
        };
        let mut objects = self.list_below(&dir_base).await?;
        let mut base = dir_base;
        if objects.is_empty() && !self.prefix.is_empty() && !self.prefix.ends_with('/') {
            // s3://bucket/data/train.tar: the prefix may name one object.
            if let Some(size) = self.head(&self.prefix).await? {
                let (parent, name) = match self.prefix.rsplit_once('/') {
                    Some((parent, name)) => (format!("{parent}/"), name),
                    None => (String::new(), self.prefix.as_str()),
                };
                objects.push(Object { name: name.to_owned(), size });
                base = parent;
            }
        }
        if objects.is_empty() {
            return Err(Error::Empty(format!("{} (no objects under {base})", self.location)));
        }
        objects.sort();
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = base;
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        sizes.clear();
        sizes.extend(objects.iter().map(|o| (o.name.clone(), o.size)));
        Ok(objects)
    }

    /// Every object whose key starts with `dir_base`, named by the rest of its key; none is not an error.
    async fn list_below(&self, dir_base: &str) -> Result<Vec<Object>, Error> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .retry("ListObjectsV2", &self.location, || {
                    // Never send a delimiter, not even an empty one: s3s-fs treats `delimiter=` as real.
                    let request = self
                        .client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(dir_base)
                        .set_continuation_token(token.clone())
                        .set_max_keys(self.opts.list_page_size);
                    async move { request.send().await.map_err(|e| self.classify("ListObjectsV2", &self.location, e)) }
                })
                .await?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let name = key.strip_prefix(dir_base).unwrap_or(key);
                // Zero-byte "folder" markers made by consoles are not data.
                if name.is_empty() || name.ends_with('/') {
                    continue;
                }
                let size = u64::try_from(object.size().unwrap_or(0)).unwrap_or(0);
                objects.push(Object { name: name.to_owned(), size });
            }
            token = page.next_continuation_token().map(str::to_owned);
            if !page.is_truncated().unwrap_or(false) || token.is_none() {
                break;
            }
        }
        Ok(objects)
    }

    /// The size of `key`, or `None` when there is no such object.
    async fn head(&self, key: &str) -> Result<Option<u64>, Error> {
        let location = self.object_location(key);
        self.retry("HeadObject", &location, || {
            let request = self.client.head_object().bucket(&self.bucket).key(key);
            let location = location.clone();
            async move {
                match request.send().await {
                    Ok(out) => Ok(Some(u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0))),
                    Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 404 => {
                        if ctx.err().code() == Some("NoSuchBucket") {
                            return Err(Failure::Fatal(Error::NoSuchBucket {
                                bucket: self.bucket.clone(),
                                region: self.region.clone(),
                            }));
                        }
                        Ok(None)
                    }
                    Err(e) => Err(self.classify("HeadObject", &location, e)),
                }
            }
        })
        .await
    }

    fn size_from_list(&self, name: &str) -> Option<u64> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
    }

    fn not_found(&self, name: &str) -> Error {
        Error::Read {
            source_desc: self.location.clone(),
            name: name.to_owned(),
            io: std::io::Error::new(std::io::ErrorKind::NotFound, "no such object (NoSuchKey)"),
        }
    }

    /// `len` bytes of `name` from `offset` (the whole object for `None`), as parallel ranged GETs of part size.
    /// `capped`: a read over [`super::MAX_OBJECT_BYTES`] (a dataset shard) is refused before anything is allocated.
    async fn read(self: Arc<Self>, name: String, range: Option<(u64, u64)>, capped: bool) -> Result<Vec<u8>, Error> {
        check_name(&self.location, &name)?;
        let key = self.key_of(&name);
        let size = match self.size_from_list(&name) {
            Some(size) => size,
            None => self.head(&key).await?.ok_or_else(|| self.not_found(&name))?,
        };
        let (start, end) = match range {
            None => (0, size),
            Some((offset, len)) => (offset.min(size), offset.saturating_add(len).min(size)),
        };
        // The size comes from the listing or a HEAD: checked before a buffer of that size is allocated.
        if capped {
            super::check_object_size(&self.location, &name, end - start)?;
        }
        if start == end {
            return Ok(Vec::new());
        }
        let part = self.opts.part_size;
        // Every GET names a range, even of a whole object: S3's Content-Range then gives the object's size, so a
        // size that differs from the listing's is known at once.
        if end - start <= part {
            let (bytes, _) = self.get(&name, &key, (start, end), size).await?;
            return Ok(bytes);
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut at = start;
        while at < end {
            let stop = (at + part).min(end);
            let (me, name, key) = (self.clone(), name.clone(), key.clone());
            tasks.spawn(async move { (at, me.get(&name, &key, (at, stop), size).await) });
            at = stop;
        }
        let mut out = vec![0u8; usize::try_from(end - start).map_err(|_| self.bug("object larger than memory"))?];
        let mut etag: Option<String> = None;
        while let Some(joined) = tasks.join_next().await {
            let (at, result) = joined.map_err(|e| self.bug(&format!("a ranged GET task failed: {e}")))?;
            let (bytes, part_etag) = result?;
            if let (Some(first), Some(this)) = (&etag, &part_etag) {
                if first != this {
                    return Err(Error::S3 {
                        location: self.object_location(&key),
                        op: "GetObject".into(),
                        detail: format!(
                            "the object changed while being read (ETag {first} then {this}); do not overwrite a \
                             dataset while a job reads it"
                        ),
                    });
                }
            }
            etag = etag.or(part_etag);
            let from = usize::try_from(at - start).map_err(|_| self.bug("offset"))?;
            out[from..from + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(out)
    }

    /// One GET of `[start, stop)` of an object of `size` bytes (as the listing or a HEAD reported), with its body
    /// read and checked, retried as one unit. An object whose size is no longer `size` fails at once.
    async fn get(
        &self,
        name: &str,
        key: &str,
        (start, stop): (u64, u64),
        size: u64,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        let location = self.object_location(key);
        let changed =
            |now: Option<u64>| Failure::Fatal(Error::ObjectChanged { location: location.clone(), listed: size, now });
        let got = self
            .retry("GetObject", &location, || {
                let request =
                    self.client.get_object().bucket(&self.bucket).key(key).range(format!("bytes={start}-{}", stop - 1));
                let location = location.clone();
                async move {
                    let out = match request.send().await {
                        Ok(out) => out,
                        Err(SdkError::ServiceError(ctx)) if ctx.err().code() == Some("NoSuchKey") => {
                            return Err(Failure::Fatal(self.not_found(name)));
                        }
                        // 416: the range starts past the object's end, so the object is shorter than listed.
                        Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 416 => {
                            let now = ctx.raw().headers().get("content-range").and_then(object_size);
                            return Err(changed(now));
                        }
                        Err(e) => return Err(self.classify("GetObject", &location, e)),
                    };
                    if let Some(now) = out.content_range().and_then(object_size) {
                        if now != size {
                            return Err(changed(Some(now)));
                        }
                    }
                    read_body(out, (start, stop)).await
                }
            })
            .await;
        match got {
            // S3 refused the range without saying the size: ask once, for the message.
            Err(Error::ObjectChanged { location, listed, now: None }) => {
                Err(Error::ObjectChanged { now: self.head(key).await.ok().flatten(), location, listed })
            }
            got => got,
        }
    }
}

/// The object's size from a `Content-Range` header (`bytes 0-99/1234`, or `bytes */1234` on a 416).
fn object_size(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

/// Reads the body of a GET of `[start, stop)`, checking it arrived whole.
async fn read_body(
    out: aws_sdk_s3::operation::get_object::GetObjectOutput,
    (start, stop): (u64, u64),
) -> Result<(Vec<u8>, Option<String>), Failure> {
    let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
    let etag = out.e_tag().map(str::to_owned);
    // A body without Content-Length (chunked) could run on forever: read no more than the bytes expected, plus
    // one to tell a longer body from an exact one.
    let limit = (stop - start).min(super::MAX_OBJECT_BYTES);
    let mut stream = out.body;
    let mut body = Vec::with_capacity(usize::try_from(limit.min(64 << 20)).unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Failure::Retry(format!("the body broke off: {}", DisplayErrorContext(&e))))?;
        body.extend_from_slice(&chunk);
        if body.len() as u64 > limit {
            return Err(Failure::Retry(format!(
                "the body ran past the {limit} bytes expected (was the object replaced while the job ran?)"
            )));
        }
    }
    let got = body.len() as u64;
    if let Some(declared) = declared.filter(|&d| d != got) {
        return Err(Failure::Retry(format!("truncated body: {got} of the {declared} bytes announced")));
    }
    if stop - start != got {
        return Err(Failure::Retry(format!("short body: {got} bytes for the range {start}-{}", stop - 1)));
    }
    Ok((body, etag))
}

impl Source for S3 {
    fn describe(&self) -> String {
        self.inner.location.clone()
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        self.run(self.inner.clone().list())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        self.run(self.inner.clone().read(name.to_owned(), None, true))
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        self.run(self.inner.clone().read(name.to_owned(), Some((offset, len)), true))
    }

    fn read_many(&self, names: Vec<String>) -> Objects<'_> {
        Box::new(Prefetch::new(self, names.into_iter().map(|name| (name, 0)).collect(), None))
    }

    fn read_ahead(&self, objects: Vec<(String, u64)>, budget: Arc<ReadBudget>) -> Objects<'_> {
        Box::new(Prefetch::new(self, objects, Some(budget)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_without_bucket_is_refused() {
        let err = S3::new("s3:///x", &S3Options::default()).unwrap_err().to_string();
        assert!(err.contains("no bucket"), "{err}");
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let opts = S3Options {
            credentials: Some(S3Credentials {
                access_key_id: "AKIAEXAMPLEKEY".into(),
                secret_access_key: "very-secret".into(),
                session_token: Some("token-xyz".into()),
            }),
            ..S3Options::default()
        };
        let shown = format!("{opts:?}");
        assert!(!shown.contains("very-secret") && !shown.contains("AKIAEXAMPLEKEY") && !shown.contains("token-xyz"));
    }
}
