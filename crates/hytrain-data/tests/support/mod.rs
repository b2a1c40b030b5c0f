//! A real S3 protocol server (s3s-fs over a folder) on a loopback port, for the S3 source tests and the benchmark.
//!
//! The server checks SigV4 signatures against fixed test credentials, so requests take the same signing path as
//! against AWS. In front of s3s's service sits [`Faults`], which can answer the next requests of one kind with a
//! fault a healthy server cannot produce on demand (503 SlowDown, 500, a dropped connection, a body cut short),
//! then lets requests through to the real service again. It also counts requests still being answered, to show
//! how many objects a client fetches at once.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hytrain_data::source::{S3Credentials, S3Options, S3RetryPolicy};

/// The access key the test server accepts.
pub const ACCESS_KEY: &str = "hytrain-test-access-key";
/// The secret key the test server accepts.
pub const SECRET_KEY: &str = "hytrain-test-secret-key";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A fault to answer a request with instead of the real answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`, S3's throttling answer.
    SlowDown,
    /// `500 InternalError`.
    Internal,
    /// The connection is dropped without an answer.
    Reset,
    /// The real answer's headers (full `Content-Length`), half its body, then the connection drops.
    Truncate,
    /// The real answer with half its body and a `Content-Length` to match: complete on the wire, but short.
    Short,
    /// The real answer's headers and half its body, then nothing more: the connection stays open, silent.
    Stall,
    /// The real answer's headers without `Content-Length`, then its body repeated without end (chunked).
    Endless,
    /// The real answer, but only once [`Faults::open_held`] is called: until then the request waits unanswered.
    Hold,
    /// `400 ExpiredToken`, S3's answer to a request signed with a session token past its expiry.
    ExpiredToken,
    /// The request's body with one byte changed, passed on to the real service: an upload damaged in transit.
    Corrupt,
    /// `404 NoSuchUpload`, S3's answer about a multipart upload it does not know (completed or aborted).
    NoSuchUpload,
}

/// Request counts by operation, and the faults still to inject.
#[derive(Default)]
pub struct Faults {
    plan: Mutex<Vec<(&'static str, Fault, usize)>>,
    counts: Mutex<HashMap<&'static str, usize>>,
    arrived: Condvar,
    /// Requests being answered (arrived, last body byte not yet handed to hyper) and the most at once, by operation.
    outstanding: Mutex<HashMap<&'static str, (usize, usize)>>,
    held_open: AtomicBool,
    held: tokio::sync::Notify,
}

impl Faults {
    /// Answers the next `times` requests of `op` (`ListObjectsV2`, `GetObject`, `HeadObject`, `PutObject`,
    /// `CreateMultipartUpload`, `UploadPart`, `CompleteMultipartUpload`, `DeleteObjects`, ...) with `fault`;
    /// `usize::MAX` for every one.
    pub fn inject(&self, op: &'static str, fault: Fault, times: usize) {
        self.plan.lock().unwrap().push((op, fault, times));
    }

    /// Injects nothing more and forgets the counts (the most outstanding included).
    pub fn reset(&self) {
        self.plan.lock().unwrap().clear();
        self.counts.lock().unwrap().clear();
        for (_, most) in self.outstanding.lock().unwrap().values_mut() {
            *most = 0;
        }
    }

    /// Waits until `n` requests of `op` have arrived, or `within` has passed; returns the count then.
    pub fn wait_for(&self, op: &str, n: usize, within: Duration) -> usize {
        let counts = self.counts.lock().unwrap();
        let (counts, _) =
            self.arrived.wait_timeout_while(counts, within, |c| c.get(op).copied().unwrap_or(0) < n).unwrap();
        counts.get(op).copied().unwrap_or(0)
    }

    /// The most requests of `op` that were being answered at once since the start or the last reset: arrived, and
    /// the last byte of the answer's body not yet produced.
    pub fn most_outstanding(&self, op: &str) -> usize {
        self.outstanding.lock().unwrap().get(op).map_or(0, |&(_, most)| most)
    }

    /// Answers the requests [`Fault::Hold`] keeps waiting, and those it would hold from now on.
    pub fn open_held(&self) {
        self.held_open.store(true, Ordering::SeqCst);
        self.held.notify_waiters();
    }

    async fn wait_until_open(&self) {
        loop {
            // Created before the flag is read, so an open_held between the two still wakes it.
            let opened = self.held.notified();
            if self.held_open.load(Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }

    /// Requests of `op` seen so far (faulted ones included).
    pub fn count(&self, op: &str) -> usize {
        self.counts.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    fn on_request(&self, op: &'static str) -> Option<Fault> {
        *self.counts.lock().unwrap().entry(op).or_default() += 1;
        self.arrived.notify_all();
        let mut plan = self.plan.lock().unwrap();
        let slot = plan.iter_mut().find(|(o, _, left)| *o == op && *left > 0)?;
        if slot.2 != usize::MAX {
            slot.2 -= 1;
        }
        Some(slot.1)
    }
}

fn operation(req: &http::Request<hyper::body::Incoming>) -> &'static str {
    let has_key = req.uri().path().trim_start_matches('/').split_once('/').is_some_and(|(_, key)| !key.is_empty());
    let query = req.uri().query().unwrap_or("");
    let has = |param: &str| query.split('&').any(|p| p == param || p.starts_with(&format!("{param}=")));
    match *req.method() {
        http::Method::GET if query.contains("list-type=2") => "ListObjectsV2",
        http::Method::GET if has_key => "GetObject",
        http::Method::HEAD if has_key => "HeadObject",
        http::Method::PUT if has("partNumber") => "UploadPart",
        http::Method::PUT => "PutObject",
        http::Method::POST if has("uploads") => "CreateMultipartUpload",
        http::Method::POST if has("uploadId") => "CompleteMultipartUpload",
        http::Method::POST if has("delete") => "DeleteObjects",
        http::Method::DELETE if has("uploadId") => "AbortMultipartUpload",
        http::Method::DELETE => "DeleteObject",
        _ => "other",
    }
}

fn xml_error(status: u16, code: &str, message: &str) -> http::Response<BoxBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    http::Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(http_body_util::Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed_unsync())
        .unwrap()
}

/// A body that yields its bytes, then fails (which makes hyper drop the connection mid-body), or with `stall`
/// never finishes.
struct CutBody(Option<Bytes>, bool);

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.0.take() {
            Some(bytes) => Poll::Ready(Some(Ok(http_body::Frame::data(bytes)))),
            None if self.1 => Poll::Pending,
            None => Poll::Ready(Some(Err("injected connection drop".into()))),
        }
    }
}

/// One request being answered, counted in [`Faults::most_outstanding`] until dropped.
struct Outstanding(Arc<Faults>, &'static str);

impl Outstanding {
    fn start(faults: Arc<Faults>, op: &'static str) -> Self {
        {
            let mut all = faults.outstanding.lock().unwrap();
            let (now, most) = all.entry(op).or_default();
            *now += 1;
            *most = (*most).max(*now);
        }
        Outstanding(faults, op)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if let Some((now, _)) = self.0.outstanding.lock().unwrap().get_mut(self.1) {
            *now -= 1;
        }
    }
}

/// An answer's body that ends its request's [`Outstanding`] when it produces its last byte (by `Content-Length`),
/// ends or is dropped: before the client can have the whole answer.
struct TrackedBody {
    inner: BoxBody,
    remaining: Option<u64>,
    outstanding: Option<Outstanding>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(left) = self.remaining.as_mut() {
                    *left = left.saturating_sub(len);
                    if *left == 0 {
                        self.outstanding = None;
                    }
                }
            }
            Poll::Ready(_) => self.outstanding = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body that repeats its bytes forever.
struct EndlessBody(Bytes);

impl http_body::Body for EndlessBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(Ok(http_body::Frame::data(self.0.clone()))))
    }
}

#[derive(Clone)]
struct FaultService {
    s3: s3s::service::S3Service,
    faults: Arc<Faults>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for FaultService {
    type Response = http::Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let op = operation(&req);
        let fault = self.faults.on_request(op);
        let outstanding = Outstanding::start(self.faults.clone(), op);
        let (s3, faults) = (self.s3.clone(), self.faults.clone());
        let answer = async move {
            let req = match fault {
                // The request's body is read before the fault answers, as S3 does: an answer before the body is
                // in makes the client see a broken connection instead of the answer.
                Some(Fault::SlowDown | Fault::Internal | Fault::ExpiredToken | Fault::NoSuchUpload) => {
                    let (parts, body) = req.into_parts();
                    let bytes = body.collect().await?.to_bytes();
                    http::Request::from_parts(parts, s3s::Body::from(bytes))
                }
                Some(Fault::Corrupt) => {
                    let (parts, body) = req.into_parts();
                    let mut bytes = body.collect().await?.to_bytes().to_vec();
                    let middle = bytes.len() / 2;
                    if let Some(byte) = bytes.get_mut(middle) {
                        *byte ^= 0x5a;
                    }
                    http::Request::from_parts(parts, s3s::Body::from(Bytes::from(bytes)))
                }
                _ => req.map(s3s::Body::from),
            };
            let real = async move {
                let response = s3.call(req).await.map_err(|e| -> BoxError { format!("{e:?}").into() })?;
                Ok::<_, BoxError>(response.map(|body| body.map_err(|e| -> BoxError { e }).boxed_unsync()))
            };
            match fault {
                None | Some(Fault::Corrupt) => real.await,
                Some(Fault::Hold) => {
                    faults.wait_until_open().await;
                    real.await
                }
                Some(Fault::ExpiredToken) => Ok(xml_error(400, "ExpiredToken", "The provided token has expired.")),
                Some(Fault::SlowDown) => Ok(xml_error(503, "SlowDown", "Please reduce your request rate.")),
                Some(Fault::NoSuchUpload) => Ok(xml_error(404, "NoSuchUpload", "The specified upload does not exist.")),
                Some(Fault::Internal) => Ok(xml_error(500, "InternalError", "We encountered an internal error.")),
                Some(Fault::Reset) => Err("injected connection reset".into()),
                Some(fault @ (Fault::Truncate | Fault::Stall)) => {
                    let (parts, body) = real.await?.into_parts();
                    let bytes = body.collect().await?.to_bytes();
                    let half = bytes.slice(..bytes.len() / 2);
                    Ok(http::Response::from_parts(parts, CutBody(Some(half), fault == Fault::Stall).boxed_unsync()))
                }
                Some(Fault::Endless) => {
                    let (mut parts, body) = real.await?.into_parts();
                    let bytes = body.collect().await?.to_bytes();
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    Ok(http::Response::from_parts(parts, EndlessBody(bytes).boxed_unsync()))
                }
                Some(Fault::Short) => {
                    let (mut parts, body) = real.await?.into_parts();
                    let bytes = body.collect().await?.to_bytes();
                    let half = bytes.slice(..bytes.len() / 2);
                    parts.headers.insert(http::header::CONTENT_LENGTH, half.len().into());
                    Ok(http::Response::from_parts(
                        parts,
                        http_body_util::Full::new(half).map_err(|e| match e {}).boxed_unsync(),
                    ))
                }
            }
        };
        Box::pin(async move {
            let response: http::Response<BoxBody> = answer.await?;
            let remaining =
                response.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
            Ok(response.map(|inner| TrackedBody { inner, remaining, outstanding: Some(outstanding) }.boxed_unsync()))
        })
    }
}

/// s3s-fs serving `root` (each subfolder a bucket) on a loopback port until dropped.
pub struct LocalS3 {
    /// The folder served; `root/<bucket>/<key>` is an object.
    pub root: PathBuf,
    /// Where the server listens.
    pub addr: SocketAddr,
    /// Fault injection and request counts.
    pub faults: Arc<Faults>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl LocalS3 {
    /// Starts serving `root` on an ephemeral loopback port.
    pub fn start(root: &Path) -> Self {
        Self::start_on(root, "127.0.0.1:0", 2)
    }

    /// Starts serving `root` on `bind` with `threads` server threads.
    pub fn start_on(root: &Path, bind: &str, threads: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("s3s-fs")
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let faults = Arc::new(Faults::default());
        let service = FaultService { s3: builder.build(), faults: faults.clone() };
        let listener = runtime.block_on(tokio::net::TcpListener::bind(bind)).expect("bind the S3 test server");
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(socket), service).await;
                });
            }
        });
        Self { root: root.to_path_buf(), addr, faults, runtime: Some(runtime) }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Options for an S3 source reading from this server: its endpoint and credentials, and a retry policy with
    /// short waits so fault tests stay quick.
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            credentials: Some(S3Credentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
                session_token: None,
            }),
            retry: S3RetryPolicy {
                max_attempts: 6,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(50),
                max_elapsed: Duration::from_secs(20),
            },
            ..S3Options::default()
        }
    }

    /// Creates `root/<bucket>/<key>` with `bytes`, as if uploaded.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path = self.root.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Changes the stored bytes of `bucket/key` with `damage`, as a store that keeps no checksum of its own (or a
    /// client that damaged the bytes before checksumming them) would serve them: the server's stored checksums are
    /// dropped (all of them), so it serves the damaged bytes as they are.
    pub fn damage(&self, bucket: &str, key: &str, damage: impl FnOnce(&mut Vec<u8>)) {
        let path = self.root.join(bucket).join(key);
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
        for entry in std::fs::read_dir(&self.root).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".bucket-") && name.ends_with(".internal.json") {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }

    /// The multipart uploads begun and neither completed nor aborted (s3s-fs keeps each as a `.upload-<id>.json`
    /// in the root, beside its parts).
    pub fn incomplete_uploads(&self) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(&self.root)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".upload-"))
            .collect();
        found.sort();
        found
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a test's data need not be stored.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Creates a FIFO at `path`, as SageMaker does for each Pipe-mode epoch.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}
