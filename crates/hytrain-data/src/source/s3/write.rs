//! Writing below an S3 prefix, for checkpoints and models sent straight to S3: uploads, deletes, and a listing
//! that may be empty.
//!
//! An object up to the upload part size goes up in one PutObject. A larger one is a multipart upload whose parts
//! (slices of the one buffer, never copied) are sent in parallel, at most [`S3Options::max_in_flight`] requests at
//! once; each part is retried on its own like any request of the source. When the upload fails for good it is
//! aborted, so no incomplete upload is left to be billed. A process killed mid-upload cannot abort: a bucket
//! lifecycle rule `AbortIncompleteMultipartUpload` removes what it left.

use std::sync::Arc;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;

use super::{check_name, Inner, Object, S3};
use crate::Error;

/// S3 refuses parts below 5 MiB (but the last).
const MIN_PART: u64 = 5 << 20;
/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Keys per DeleteObjects request, S3's limit.
const DELETE_BATCH: usize = 1000;

/// The part size for an upload of `len` bytes: the source's part size, raised to S3's minimum, and further where
/// the object would otherwise need more than S3's 10,000 parts.
fn upload_part_size(part_size: u64, len: u64) -> u64 {
    part_size.max(MIN_PART).max(len.div_ceil(MAX_PARTS))
}

impl S3 {
    /// Uploads `body` as the object `name` below the prefix (`s3://bucket/prefix/name`), replacing any object of
    /// that name only once the whole body is in S3: a reader sees the old object or the new one, never a part.
    pub fn put(&self, name: &str, body: Bytes) -> Result<(), Error> {
        self.run(self.inner.clone().put(name.to_owned(), body))
    }

    /// Deletes the objects `names` below the prefix; names without an object are not an error.
    pub fn delete(&self, names: &[String]) -> Result<(), Error> {
        self.run(self.inner.clone().delete(names.to_vec()))
    }

    /// The whole object `name` below the prefix, of any size (a checkpoint's optimizer state can pass the limit
    /// [`super::super::MAX_OBJECT_BYTES`] that reads of dataset shards keep), as parallel ranged GETs.
    pub fn read_whole(&self, name: &str) -> Result<Vec<u8>, Error> {
        self.run(self.inner.clone().read(name.to_owned(), None, false))
    }

    /// Every object below the prefix, named as [`super::Source::list`] names them, in key order; an empty prefix
    /// has none (where `list` calls that an error, a dataset being expected there).
    pub fn list_all(&self) -> Result<Vec<Object>, Error> {
        let inner = self.inner.clone();
        self.run(async move {
            let base = inner.key_of("");
            let mut objects = inner.list_below(&base).await?;
            objects.sort();
            Ok(objects)
        })
    }
}

impl Inner {
    async fn put(self: Arc<Self>, name: String, body: Bytes) -> Result<(), Error> {
        check_name(&self.location, &name)?;
        let me: &Inner = &self;
        let key = self.key_of(&name);
        let location = self.object_location(&key);
        let part = upload_part_size(self.opts.part_size, body.len() as u64);
        if body.len() as u64 <= part {
            return me
                .retry("PutObject", &location, || {
                    let request =
                        me.client.put_object().bucket(&self.bucket).key(&key).body(ByteStream::from(body.clone()));
                    let location = location.clone();
                    async move { request.send().await.map(|_| ()).map_err(|e| me.classify("PutObject", &location, e)) }
                })
                .await;
        }
        let created = me
            .retry("CreateMultipartUpload", &location, || {
                let request = me.client.create_multipart_upload().bucket(&self.bucket).key(&key);
                let location = location.clone();
                async move { request.send().await.map_err(|e| me.classify("CreateMultipartUpload", &location, e)) }
            })
            .await?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(self.bug("CreateMultipartUpload answered without an upload id"));
        };
        let uploaded = match self.clone().upload_parts(&key, &upload_id, body.clone(), part).await {
            Ok(parts) => self.complete(&key, &upload_id, parts).await,
            Err(e) => Err(e),
        };
        if uploaded.is_err() {
            self.abort(&key, &upload_id).await;
        }
        uploaded
    }

    /// Sends every part of `body` in parallel; the parts S3 took, in order.
    async fn upload_parts(
        self: Arc<Self>,
        key: &str,
        upload_id: &str,
        body: Bytes,
        part: u64,
    ) -> Result<Vec<CompletedPart>, Error> {
        let mut tasks = tokio::task::JoinSet::new();
        let len = body.len() as u64;
        let mut at = 0u64;
        let mut number = 0i32;
        while at < len {
            let stop = (at + part).min(len);
            number += 1;
            let slice = body.slice(at as usize..stop as usize);
            let (me, key, upload_id) = (self.clone(), key.to_owned(), upload_id.to_owned());
            tasks.spawn(async move { me.upload_part(&key, &upload_id, number, slice).await });
            at = stop;
        }
        let mut parts = Vec::with_capacity(number as usize);
        while let Some(joined) = tasks.join_next().await {
            // Returning drops the set, which cancels the parts still in flight.
            let part = joined.map_err(|e| self.bug(&format!("an upload task failed: {e}")))??;
            parts.push(part);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, slice: Bytes) -> Result<CompletedPart, Error> {
        let location = self.object_location(key);
        let e_tag = self
            .retry("UploadPart", &location, || {
                let request = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(slice.clone()));
                let location = location.clone();
                async move {
                    let out = request.send().await.map_err(|e| self.classify("UploadPart", &location, e))?;
                    Ok(out.e_tag().map(str::to_owned))
                }
            })
            .await?;
        Ok(CompletedPart::builder().part_number(number).set_e_tag(e_tag).build())
    }

    /// Completes the upload. A retry of a Complete whose answer was lost finds the upload gone (S3 says
    /// `NoSuchUpload`, some S3-compatible stores another refusal): the object is then checked to be this upload's
    /// by its ETag, which S3 computes from the parts' ETags.
    async fn complete(&self, key: &str, upload_id: &str, parts: Vec<CompletedPart>) -> Result<(), Error> {
        let location = self.object_location(key);
        let expected = multipart_e_tag(&parts);
        let upload = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let mut attempts = 0u32;
        let refused = self
            .retry("CompleteMultipartUpload", &location, || {
                attempts += 1;
                let retried = attempts > 1;
                let request = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(upload.clone());
                let location = location.clone();
                async move {
                    match request.send().await {
                        Ok(_) => Ok(None),
                        Err(SdkError::ServiceError(ctx)) if retried && ctx.raw().status().is_client_error() => {
                            let said = ctx.err().meta().code().unwrap_or("refused").to_owned();
                            Ok(Some(said))
                        }
                        Err(e) => Err(self.classify("CompleteMultipartUpload", &location, e)),
                    }
                }
            })
            .await?;
        let Some(refusal) = refused else {
            return Ok(());
        };
        let found = self.e_tag(key).await?;
        if found.is_some() && found == expected {
            return Ok(());
        }
        Err(Error::S3 {
            location,
            op: "CompleteMultipartUpload".into(),
            detail: format!(
                "a retried completion was refused ({refusal}) and the object is not this upload's (ETag {}, \
                 expected {}); another writer may be using the same prefix",
                found.as_deref().unwrap_or("none"),
                expected.as_deref().unwrap_or("unknown")
            ),
        })
    }

    /// The ETag of `key` without its quotes, or `None` when there is no such object.
    async fn e_tag(&self, key: &str) -> Result<Option<String>, Error> {
        let location = self.object_location(key);
        self.retry("HeadObject", &location, || {
            let request = self.client.head_object().bucket(&self.bucket).key(key);
            let location = location.clone();
            async move {
                match request.send().await {
                    Ok(out) => Ok(out.e_tag().map(|t| t.trim_matches('"').to_owned())),
                    Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 404 => Ok(None),
                    Err(e) => Err(self.classify("HeadObject", &location, e)),
                }
            }
        })
        .await
    }

    /// Aborts an upload that failed, so S3 keeps (and bills) none of its parts; a failure to abort is logged.
    async fn abort(&self, key: &str, upload_id: &str) {
        let location = self.object_location(key);
        let aborted = self
            .retry("AbortMultipartUpload", &location, || {
                let request = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id);
                let location = location.clone();
                async move {
                    match request.send().await {
                        Ok(_) => Ok(()),
                        Err(SdkError::ServiceError(ctx)) if ctx.err().meta().code() == Some("NoSuchUpload") => Ok(()),
                        Err(e) => Err(self.classify("AbortMultipartUpload", &location, e)),
                    }
                }
            })
            .await;
        match aborted {
            Ok(()) => tracing::info!(location, upload_id, "failed multipart upload aborted"),
            Err(e) => tracing::warn!(
                location,
                upload_id,
                error = %e,
                "cannot abort the failed multipart upload; its parts stay billed until a bucket lifecycle rule \
                 (AbortIncompleteMultipartUpload) removes them"
            ),
        }
    }

    async fn delete(self: Arc<Self>, names: Vec<String>) -> Result<(), Error> {
        let me: &Inner = &self;
        for batch in names.chunks(DELETE_BATCH) {
            let mut objects = Vec::with_capacity(batch.len());
            for name in batch {
                check_name(&self.location, name)?;
                let id = ObjectIdentifier::builder()
                    .key(self.key_of(name))
                    .build()
                    .map_err(|e| self.bug(&format!("building a delete request: {e}")))?;
                objects.push(id);
            }
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| self.bug(&format!("building a delete request: {e}")))?;
            let out = self
                .retry("DeleteObjects", &self.location, || {
                    let request = me.client.delete_objects().bucket(&me.bucket).delete(delete.clone());
                    async move { request.send().await.map_err(|e| me.classify("DeleteObjects", &me.location, e)) }
                })
                .await?;
            if let Some(failed) = out.errors().first() {
                return Err(Error::S3 {
                    location: self.object_location(failed.key().unwrap_or("?")),
                    op: "DeleteObjects".into(),
                    detail: format!(
                        "{} of {} objects were not deleted; the first: {} {}",
                        out.errors().len(),
                        batch.len(),
                        failed.code().unwrap_or("error"),
                        failed.message().unwrap_or("")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The ETag S3 gives an object completed from `parts`: the MD5 of the parts' MD5s, a dash, the part count. `None`
/// when a part's ETag is not an MD5 (SSE-KMS).
fn multipart_e_tag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for part in parts {
        let hex = part.e_tag()?.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            all.update([u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?]);
        }
    }
    let digest: String = all.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{digest}-{}", parts.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_at_least_five_mib_and_at_most_ten_thousand() {
        assert_eq!(upload_part_size(8 << 20, 100 << 20), 8 << 20);
        assert_eq!(upload_part_size(32 << 10, 100 << 20), MIN_PART);
        let huge = 200u64 << 30;
        let part = upload_part_size(8 << 20, huge);
        assert!(huge.div_ceil(part) <= MAX_PARTS && part > 8 << 20);
    }
}
