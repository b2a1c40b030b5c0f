//! hytrain-data's integration tests, one test binary (each binary links the S3 SDK and its server, so one link
//! instead of eleven): formats, packing, the pipeline, the Pipe source, byte identity across sources, and S3 reads,
//! writes and faults against a real s3s-fs server. `s3_credentials` stays its own binary: it sets the process's
//! AWS environment.

#[path = "../common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod formats;
mod fuzz_corpus;
mod identity;
mod pack;
mod pipe_source;
mod pipeline;
mod s3_faults;
mod s3_source;
mod s3_upload;
mod shared_counts;
mod transform_reference;
