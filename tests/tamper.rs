//! Tampering with sealed files on disk: every whole read must fail as a whole, and a read of
//! some columns on the segments it reads (`projected::tests` covers the segments it skips).

use std::path::PathBuf;

use escrow::store::Store;

use crate::harness::{Env, accounts_csv};

const SEGMENT: usize = escrow::crypto::seal::DEFAULT_SEGMENT_SIZE as usize;
const TAG: usize = 16;
const HEADER: usize = escrow::crypto::seal::HEADER_LEN;

/// Two datasets uploaded (the first big enough for several segments); returns the env and
/// the sealed file of `big` and of `small`.
fn setup() -> (Env, PathBuf, PathBuf) {
    let env = Env::new();
    let server = env.serve(&[]);
    let big = env.file("big.csv", accounts_csv(60_000, "big").as_bytes());
    let small = env.file("small.csv", accounts_csv(100, "small").as_bytes());
    env.upload(&server, "acme", &big, "big", &[]).ok();
    env.upload(&server, "acme", &small, "small", &[]).ok();
    drop(server);
    let store = store(&env);
    let file_of = |name: &str| {
        let k = &store.catalog().version_keys("acme", name).expect("keys")[0];
        env.data
            .join("datasets")
            .join(&k.dataset_id)
            .join(format!("{}.sealed", k.version_id))
    };
    let (b, s) = (file_of("big"), file_of("small"));
    let len = std::fs::metadata(&b).expect("meta").len() as usize;
    assert!(
        len > HEADER + 3 * (SEGMENT + TAG),
        "big dataset must span several segments ({len} bytes)"
    );
    (env, b, s)
}

fn store(env: &Env) -> Store {
    crate::harness::open_store(&env.data)
}

fn read_fails(env: &Env, name: &str, why: &str) {
    let r = store(env)
        .read_live("acme", name)
        .and_then(|b| b.collect_all());
    match r {
        Err(escrow::Error::Integrity(_)) => {}
        other => panic!(
            "{why}: expected an integrity failure, got {:?}",
            other.map(|b| b.len())
        ),
    }
}

#[test]
fn untouched_files_read() {
    let (env, _, _) = setup();
    let b = store(&env)
        .read_live("acme", "big")
        .expect("open")
        .collect_all()
        .expect("read");
    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 60_000);
}

#[test]
fn flipped_byte_fails() {
    let (env, big, _) = setup();
    let mut bytes = std::fs::read(&big).expect("read");
    for at in [HEADER + 10, HEADER + SEGMENT + TAG + 5, bytes.len() - 3] {
        let orig = bytes.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&big, &bytes).expect("write");
        read_fails(&env, "big", &format!("flip at {at}"));
        bytes = orig;
    }
    // the header too (it is bound into every segment)
    bytes[20] ^= 0x01;
    std::fs::write(&big, &bytes).expect("write");
    read_fails(&env, "big", "flip in header");
}

#[test]
fn swapped_segments_fail() {
    let (env, big, _) = setup();
    let mut bytes = std::fs::read(&big).expect("read");
    let seg = SEGMENT + TAG;
    let (a, b) = (HEADER + seg, HEADER + 2 * seg);
    let first = bytes[a..a + seg].to_vec();
    bytes.copy_within(b..b + seg, a);
    bytes[b..b + seg].copy_from_slice(&first);
    std::fs::write(&big, &bytes).expect("write");
    read_fails(&env, "big", "swap segments 1 and 2");
}

#[test]
fn truncation_fails() {
    let (env, big, _) = setup();
    let bytes = std::fs::read(&big).expect("read");
    let seg = SEGMENT + TAG;
    for cut in [HEADER + 2 * seg, bytes.len() - 1, HEADER + 100, 10] {
        std::fs::write(&big, &bytes[..cut]).expect("write");
        read_fails(&env, "big", &format!("truncate to {cut}"));
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&bytes[HEADER..HEADER + seg]);
    std::fs::write(&big, &longer).expect("write");
    read_fails(&env, "big", "segment appended");
}

#[test]
fn file_swapped_between_versions_fails() {
    let (env, big, small) = setup();
    std::fs::copy(&small, &big).expect("copy");
    read_fails(&env, "big", "small's file over big's");
    // a version's own older file over its newer one
    let server = env.serve(&[]);
    let v = env.file("v.csv", accounts_csv(50, "v2").as_bytes());
    env.upload(&server, "acme", &v, "small", &[]).ok();
    drop(server);
    let keys = store(&env)
        .catalog()
        .version_keys("acme", "small")
        .expect("keys");
    assert_eq!(keys.len(), 2);
    let newest = env
        .data
        .join("datasets")
        .join(&keys[0].dataset_id)
        .join(format!("{}.sealed", keys[0].version_id));
    std::fs::copy(&small, &newest).expect("copy");
    read_fails(&env, "small", "version 1's file over version 2's");
}

/// Through the service: a flipped byte in a sealed file fails queries over it, even after
/// the version was read into the plaintext cache; the client sees a generic error only.
#[test]
fn flipped_byte_fails_queries_through_the_service() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(500, "q"))
        .ok();
    let sql = "SELECT status, COUNT(DISTINCT website) FROM acme.accounts GROUP BY status";
    env.cli(&server, "acme", &["query", sql]).ok(); // now cached
    let file = env.sealed_files().pop().expect("a sealed file");
    let mut bytes = std::fs::read(&file).expect("read");
    let at = HEADER + 100;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).expect("write");
    let r = env
        .cli(&server, "acme", &["query", sql])
        .fails_with("(internal)");
    assert!(r.stderr.contains("incident"), "{}", r.stderr);
    assert!(!r.stderr.contains("authentication"), "{}", r.stderr);
    server.wait_log("sealed data failed authentication");
}

/// A question reads only its columns: read alone, from the cache, or some cached and some
/// read, they are the version's columns as a whole read gives them.
#[test]
fn columns_read_apart_are_the_columns_of_a_whole_read() {
    let (env, _, _) = setup();
    let store = std::sync::Arc::new(store(&env));
    let whole = store
        .read_live("acme", "big")
        .expect("open")
        .collect_all()
        .expect("read");
    let schema = whole[0].schema();
    let form = escrow::store::Form {
        schema: schema.clone(),
        columns: (0..schema.fields().len()).map(|c| (c, None)).collect(),
    };
    let v = store.live_version("acme", "big").expect("version");
    let read = |columns: &[usize]| -> Vec<arrow_array::RecordBatch> {
        let mark = store.read_mark(&v).expect("mark");
        store
            .batches(&v, mark, &form, columns)
            .expect("batches")
            .collect::<escrow::Result<_>>()
            .expect("read")
    };
    let status = schema.index_of("status").expect("status");
    let website = schema.index_of("website").expect("website");
    // status alone (read), then status with website (one cached, one read), then both again
    // (both cached), then every column
    for columns in [
        vec![status],
        vec![website, status],
        vec![website, status],
        (0..schema.fields().len()).collect(),
    ] {
        let got = read(&columns);
        assert_eq!(got.len(), whole.len());
        for (g, w) in got.iter().zip(&whole) {
            assert_eq!(g, &w.project(&columns).expect("project"), "{columns:?}");
        }
    }
}

/// What a version's plaintext was reduced to, sealed beside it (`Store::seal_derived`), opens
/// only as the name and version it was sealed for: moved onto another name or version,
/// altered or cut short, it is an integrity failure; written again, it is sealed under a
/// fresh key (its salt), never under the nonces of the first. Startup recovery removes one
/// whose version the catalog does not list, and one torn by a crash, and keeps the others.
#[test]
fn derived_objects_open_only_as_what_they_were_sealed_as() {
    let (env, big, _) = setup();
    let store = store(&env);
    let key = |name: &str| store.catalog().version_keys("acme", name).expect("keys")[0].clone();
    let (b, s) = (key("big"), key("small"));
    let path = |v: &escrow::catalog::VersionKey, name: &str| {
        env.data.join(escrow::objects::derived_key(
            &v.dataset_id,
            &v.version_id,
            name,
        ))
    };
    let plaintext: Vec<u8> = (0..(3 * SEGMENT + 17)).map(|i| (i % 251) as u8).collect();
    store.seal_derived(&b, "x", &plaintext).expect("sealed");
    assert_eq!(
        store.open_derived(&b, "x").expect("opens"),
        Some(plaintext.clone())
    );
    assert_eq!(store.open_derived(&b, "y").expect("none"), None);
    assert_eq!(store.open_derived(&s, "x").expect("none"), None);
    let sealed = std::fs::read(path(&b, "x")).expect("on disk");
    let integrity = |v: &escrow::catalog::VersionKey, name: &str, why: &str| match store
        .open_derived(v, name)
    {
        Err(escrow::Error::Integrity(_)) => {}
        other => panic!("{why}: expected an integrity failure, got {other:?}"),
    };
    // Moved onto another name of the same version, or the same name of another version.
    std::fs::write(path(&b, "y"), &sealed).expect("copy");
    integrity(&b, "y", "another name");
    std::fs::write(path(&s, "x"), &sealed).expect("copy");
    integrity(&s, "x", "another version");
    // Altered anywhere (salt, header, a segment, the last tag), or cut short.
    for at in [3, 32 + 20, 32 + HEADER + SEGMENT + 5, sealed.len() - 1] {
        let mut altered = sealed.clone();
        altered[at] ^= 1;
        std::fs::write(path(&b, "x"), &altered).expect("altered");
        integrity(&b, "x", &format!("flip at {at}"));
    }
    std::fs::write(path(&b, "x"), &sealed[..sealed.len() - SEGMENT]).expect("cut");
    integrity(&b, "x", "cut short");
    // Written again: the same plaintext under a fresh salt, so other bytes throughout.
    store
        .seal_derived(&b, "x", &plaintext)
        .expect("sealed again");
    let again = std::fs::read(path(&b, "x")).expect("on disk");
    assert_eq!(again.len(), sealed.len());
    let same = again.iter().zip(&sealed).filter(|(x, y)| x == y).count();
    assert!(same < sealed.len() / 100, "{same} bytes in common");
    assert_eq!(store.open_derived(&b, "x").expect("opens"), Some(plaintext));
    // Recovery: a derived object of a version the catalog does not list goes, the rest stay.
    let orphan = big
        .parent()
        .expect("dir")
        .join("00000000000000000000000000000000.0123456789abcdef.derived");
    std::fs::write(&orphan, b"orphan").expect("orphan");
    // And what a crash leaves of one being written (`fsutil::atomic_write`'s temporary).
    let torn = path(&b, "x").with_extension("tmp-4242-7");
    std::fs::write(&torn, &sealed[..100]).expect("torn");
    drop(store);
    let recovered = crate::harness::open_store(&env.data)
        .recover()
        .expect("recovery");
    assert_eq!(recovered.orphan_files_removed, 2);
    assert!(!orphan.exists() && !torn.exists());
    assert!(path(&b, "x").exists() && path(&s, "x").exists());
}
