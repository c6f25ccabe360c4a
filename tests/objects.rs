//! The object-store conformance suite on a real S3-compatible server (moto), which is the
//! S3 backend of `--objects`; the local backend runs the same suite in escrow-store.

use crate::s3server::Bucket;

escrow_store::objects_conformance!(|| {
    let bucket = Bucket::new();
    (bucket.open(), tempfile::tempdir().expect("tmp"))
});
