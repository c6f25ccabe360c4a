//! The object-store conformance suite on a real S3-compatible server (moto): the S3 backend
//! of `--objects`, and the same behind the node-local copies a node keeps of it (the local
//! backend runs the suite in escrow-store).

use std::io::Read;
use std::sync::Arc;

use escrow::objects::cached::CachedObjects;
use escrow::objects::{Objects, SharedObjects, version_key};

use crate::s3server::Bucket;

escrow_store::objects_conformance!(|| {
    let bucket = Bucket::new();
    (bucket.open(), tempfile::tempdir().expect("tmp"))
});

mod cached {
    use super::*;

    escrow_store::objects_conformance!(|| {
        let scratch = tempfile::tempdir().expect("tmp");
        let cached =
            CachedObjects::new(Bucket::new().open(), &scratch.path().join("cache")).expect("cache");
        (Arc::new(cached) as SharedObjects, scratch)
    });
}

#[test]
fn a_node_reads_each_version_from_the_store_once_and_only_while_it_is_there() {
    let bucket = Bucket::new();
    let scratch = tempfile::tempdir().expect("tmp");
    let node =
        |name: &str| CachedObjects::new(bucket.open(), &scratch.path().join(name)).expect("cache");
    let copies = |name: &str| {
        let local =
            escrow::objects::local::LocalObjects::new(scratch.path().join(name).join("objects"))
                .expect("local");
        local.list("datasets/").expect("list").len()
    };
    let (a, b) = (node("a"), node("b"));
    let key = version_key("0a", "0b");
    let bytes = b"sealed bytes, ".repeat(10_000);
    let from = scratch.path().join("v");
    std::fs::write(&from, &bytes).expect("write");
    a.put_file(&key, &from).expect("put");
    assert_eq!(copies("a"), 1, "the uploading node keeps what it sealed");
    assert_eq!(copies("b"), 0);
    let read = |node: &CachedObjects| {
        let mut out = Vec::new();
        node.open(&key)
            .expect("open")
            .expect("present")
            .read_to_end(&mut out)
            .expect("read");
        out
    };
    assert_eq!(read(&b), bytes);
    assert_eq!(copies("b"), 1, "another node copies it on its first read");
    assert_eq!(read(&b), bytes);
    assert_eq!(read(&a), bytes);
    // Gone from the store (deleted by some other node): no node reads its copy any more,
    // and pruning drops the copies.
    bucket.open().delete(&key).expect("delete");
    assert!(a.open(&key).expect("open").is_none());
    assert!(b.open(&key).expect("open").is_none());
    assert_eq!(a.prune(&|_, _| false).expect("prune"), 1);
    assert_eq!(b.prune(&|_, _| true).expect("prune"), 0);
    assert_eq!((copies("a"), copies("b")), (0, 1));
}
