//! The object stores' conformance suite: every behaviour the dataset store relies on, as
//! functions over any backend. `objects_conformance!(fixture)` turns them into one test each;
//! the local backend runs them here, the S3 backend against a real S3 server in the
//! `escrow` crate's tests. A fixture returns the store and a scratch directory on the same
//! machine (for the files that `put_file` consumes).
//!
//! Test support compiled into the library (the `escrow` crate's tests use it): its checks
//! panic, as tests do.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{OBJECTS_ID, Objects, bind, dataset_prefix, version_key};
use crate::catalog::Catalog;
use crate::crypto::seal::{self, Binding, OpenReader, SealWriter};

/// Turn every behaviour below into a `#[test]` run on the backend `fixture` makes.
#[macro_export]
macro_rules! objects_conformance {
    ($fixture:expr) => {
        $crate::objects_conformance!(@tests $fixture;
            a_put_file_reads_back_whole_and_is_consumed,
            a_large_object_goes_up_in_parts_and_reads_back_in_ranges,
            absent_objects_are_none_and_deleting_them_is_no_error,
            listing_follows_puts_and_deletes,
            a_rewritten_object_changes_its_stamp,
            a_swapped_or_truncated_sealed_object_fails_its_read,
            keys_that_leave_the_store_are_refused,
            a_store_and_its_catalog_bind_to_each_other,
        );
    };
    (@tests $fixture:expr; $($name:ident),* $(,)?) => {
        $(#[test]
        fn $name() {
            let (objects, scratch) = ($fixture)();
            $crate::objects::conformance::$name(&*objects, scratch.path());
        })*
    };
}

/// Bytes that differ at every position of a long run (so a misplaced range shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

fn file_with(scratch: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch.join(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    path
}

fn read_all(objects: &dyn Objects, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    objects
        .open(key)
        .expect("open")
        .expect("object present")
        .read_to_end(&mut out)
        .expect("read");
    out
}

pub fn a_put_file_reads_back_whole_and_is_consumed(objects: &dyn Objects, scratch: &Path) {
    let bytes = pattern(3 << 20, 1);
    let from = file_with(scratch, "v1", &bytes);
    let key = version_key("0a", "0b");
    objects.put_file(&key, &from).expect("put");
    assert!(!from.exists(), "the source file is consumed");
    assert_eq!(read_all(objects, &key), bytes);
    assert_eq!(
        objects.head(&key).expect("head").map(|m| m.size),
        Some(3 << 20)
    );
    assert_eq!(
        objects.get_bytes(&key).expect("get").as_deref(),
        Some(&bytes[..])
    );
}

pub fn a_large_object_goes_up_in_parts_and_reads_back_in_ranges(
    objects: &dyn Objects,
    scratch: &Path,
) {
    // Larger than a remote backend's part and read-range sizes, and not a multiple of them.
    let bytes = pattern(37 * (1 << 20) + 12_345, 2);
    let key = version_key("0c", "0d");
    objects
        .put_file(&key, &file_with(scratch, "big", &bytes))
        .expect("put");
    let mut reader = objects.open(&key).expect("open").expect("present");
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 100_003]);
    loop {
        let n = reader.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "the object reads back byte for byte");
}

pub fn absent_objects_are_none_and_deleting_them_is_no_error(objects: &dyn Objects, _: &Path) {
    let key = version_key("0e", "0f");
    assert!(objects.head(&key).expect("head").is_none());
    assert!(objects.open(&key).expect("open").is_none());
    assert!(objects.get_bytes("objects.id").expect("get").is_none());
    objects.delete(&key).expect("delete of nothing");
    assert!(objects.list("datasets/").expect("list").is_empty());
}

pub fn listing_follows_puts_and_deletes(objects: &dyn Objects, scratch: &Path) {
    let keys = [
        version_key("aa", "01"),
        version_key("aa", "02"),
        version_key("bb", "01"),
    ];
    for (i, key) in keys.iter().enumerate() {
        let from = file_with(scratch, &format!("f{i}"), &pattern(1000 + i, 3));
        objects.put_file(key, &from).expect("put");
    }
    objects.put_bytes("objects.id", b"c0ffee").expect("marker");
    let listed = |prefix: &str| -> Vec<(String, u64)> {
        let metas = objects.list(prefix).expect("list");
        metas.into_iter().map(|m| (m.key, m.size)).collect()
    };
    assert_eq!(
        listed("datasets/"),
        vec![
            (keys[0].clone(), 1000),
            (keys[1].clone(), 1001),
            (keys[2].clone(), 1002)
        ]
    );
    assert_eq!(listed(&dataset_prefix("aa")).len(), 2);
    objects.delete(&keys[0]).expect("delete");
    assert_eq!(listed(&dataset_prefix("aa")), vec![(keys[1].clone(), 1001)]);
    objects.delete(&keys[1]).expect("delete");
    assert!(listed(&dataset_prefix("aa")).is_empty());
    assert_eq!(listed("datasets/"), vec![(keys[2].clone(), 1002)]);
    assert_eq!(
        objects.get_bytes("objects.id").expect("get").as_deref(),
        Some(&b"c0ffee"[..])
    );
    for meta in objects.list("datasets/").expect("list") {
        assert!(meta.age < std::time::Duration::from_secs(600), "{meta:?}");
    }
}

pub fn a_rewritten_object_changes_its_stamp(objects: &dyn Objects, scratch: &Path) {
    let key = version_key("0c", "01");
    objects
        .put_file(&key, &file_with(scratch, "a", &pattern(5000, 4)))
        .expect("put");
    let before = objects.head(&key).expect("head").expect("present");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    objects
        .put_file(&key, &file_with(scratch, "b", &pattern(5000, 5)))
        .expect("put again");
    let after = objects.head(&key).expect("head").expect("present");
    assert_eq!(after.size, 5000);
    assert_ne!(
        before.stamp, after.stamp,
        "a replaced object has a new stamp"
    );
}

/// Seal `plain` as version `version` of dataset 1 under `dek`.
fn sealed(dek: &[u8; 32], version: u8, plain: &[u8]) -> (Binding, Vec<u8>) {
    let binding = Binding {
        dataset: [1; 16],
        version: [version; 16],
    };
    let mut w = SealWriter::new(Vec::new(), dek, binding, 4096).expect("seal");
    w.write_all(plain).expect("write");
    (binding, w.finish().expect("finish").0)
}

fn open_sealed(
    objects: &dyn Objects,
    key: &str,
    dek: &[u8; 32],
    b: Binding,
) -> std::io::Result<Vec<u8>> {
    let reader = objects.open(key).expect("open").expect("present");
    let mut out = Vec::new();
    OpenReader::new(reader, dek, b)?.read_to_end(&mut out)?;
    Ok(out)
}

pub fn a_swapped_or_truncated_sealed_object_fails_its_read(objects: &dyn Objects, scratch: &Path) {
    let dek = [7u8; 32];
    let plain = pattern(50_000, 6);
    let (b1, v1) = sealed(&dek, 1, &plain);
    let (_, v2) = sealed(&dek, 2, &pattern(50_000, 7));
    let key = version_key("01", "01");
    let put = |name: &str, bytes: &[u8]| {
        objects
            .put_file(&key, &file_with(scratch, name, bytes))
            .expect("put");
    };
    put("v1", &v1);
    assert_eq!(
        open_sealed(objects, &key, &dek, b1).expect("authentic"),
        plain
    );
    let fails = |why: &str| match open_sealed(objects, &key, &dek, b1) {
        Err(e) => assert!(seal::is_integrity_error(&e), "{why}: {e}"),
        Ok(_) => panic!("{why}: read succeeded"),
    };
    put("swapped", &v2);
    fails("another version's object in its place");
    put("truncated", &v1[..v1.len() - 4096]);
    fails("truncated by a segment");
    put("cut", &v1[..v1.len() - 1]);
    fails("truncated by a byte");
    let mut flipped = v1.clone();
    flipped[v1.len() / 2] ^= 1;
    put("flipped", &flipped);
    fails("a flipped bit");
}

pub fn keys_that_leave_the_store_are_refused(objects: &dyn Objects, scratch: &Path) {
    for key in ["../escape", "/abs", "datasets/../../x", ""] {
        assert!(objects.put_bytes(key, b"x").is_err(), "{key:?}");
        let from = file_with(scratch, "f", b"x");
        assert!(objects.put_file(key, &from).is_err(), "{key:?}");
        assert!(objects.get_bytes(key).is_err(), "{key:?}");
        assert!(objects.open(key).is_err(), "{key:?}");
        assert!(objects.head(key).is_err(), "{key:?}");
        assert!(objects.delete(key).is_err(), "{key:?}");
    }
    assert!(objects.list("../").is_err());
}

pub fn a_store_and_its_catalog_bind_to_each_other(objects: &dyn Objects, scratch: &Path) {
    let catalog = |name: &str| {
        let c = Catalog::open(&scratch.join(name)).expect("catalog");
        c.bind_new_id().expect("id");
        c
    };
    let code = |r: crate::Result<()>| r.err().map(|e| e.code());
    let (c1, c2) = (catalog("c1.db"), catalog("c2.db"));
    bind(objects, &c1).expect("a new store binds to a new catalog");
    bind(objects, &c1).expect("and again");
    let recorded = c1
        .objects_id()
        .expect("read")
        .expect("the catalog records its store");
    let marker = objects.get_bytes(OBJECTS_ID).expect("get").expect("marker");
    assert!(String::from_utf8_lossy(&marker).contains(&recorded));
    assert_eq!(
        code(bind(objects, &c2)),
        Some("wrong_objects"),
        "another catalog's store"
    );
    // A store holding sealed objects that c1 did not record (its marker gone: as the data
    // directory's own folder, met by a node started without --objects).
    let key = version_key("0a", "0b");
    objects
        .put_file(&key, &file_with(scratch, "v", b"sealed"))
        .expect("put");
    objects.delete(OBJECTS_ID).expect("delete marker");
    assert_eq!(
        code(bind(objects, &c1)),
        Some("wrong_objects"),
        "unrecorded store"
    );
    // A new catalog does not take a store full of another deployment's objects.
    assert_eq!(
        code(bind(objects, &catalog("c3.db"))),
        Some("wrong_objects")
    );
    // Nothing stored on either side: a catalog may still choose its store.
    objects.delete(&key).expect("delete");
    bind(objects, &c1).expect("rebinding before any upload");
    assert_ne!(c1.objects_id().expect("read"), Some(recorded));
    bind(objects, &c1).expect("bound to the new one");
}
