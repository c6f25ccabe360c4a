#![allow(clippy::expect_used)]
//! Sealing throughput micro-benchmark: AES-256-GCM segmented sealing (into a sink) and
//! opening (from memory) of 1 GiB on one core. Run: `cargo bench -p escrow --bench seal`.
//! Reports GB/s (10^9 bytes per second) and GiB/s; the target is >= 0.9 GB/s sealing.

use std::io::{Read, Write};
use std::time::Instant;

use escrow::crypto::seal::{Binding, DEFAULT_SEGMENT_SIZE, OpenReader, SealWriter};

fn main() {
    let total: usize = std::env::var("SEAL_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let key = [7u8; 32];
    let binding = Binding {
        dataset: [1; 16],
        version: [2; 16],
    };
    let chunk: Vec<u8> = (0..(256 << 10)).map(|i| (i % 251) as u8).collect();

    let seal_into = |out: &mut dyn Write| {
        let mut w = SealWriter::new(out, &key, binding, DEFAULT_SEGMENT_SIZE).expect("writer");
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
        w.finish().expect("finish");
    };
    // Sealing cost itself (framing, copy into the segment buffer, AES-256-GCM) into a sink,
    // the way the upload path hands segments to a buffered file writer.
    let mut best_seal = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        seal_into(&mut std::io::sink());
        best_seal = best_seal.min(start.elapsed().as_secs_f64());
    }
    let mut sealed = Vec::with_capacity(total + total / 1000 + 4096);
    seal_into(&mut sealed);
    let mut best_open = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut r = OpenReader::new(&sealed[..], &key, binding).expect("reader");
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0usize;
        loop {
            let k = r.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        assert_eq!(n, total);
        best_open = best_open.min(start.elapsed().as_secs_f64());
    }
    let gb = total as f64 / 1e9;
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "seal  {:.0} MB in {:.3}s: {:.2} GB/s ({:.2} GiB/s)",
        gb * 1e3,
        best_seal,
        gb / best_seal,
        gib / best_seal
    );
    println!(
        "open  {:.0} MB in {:.3}s: {:.2} GB/s ({:.2} GiB/s)",
        gb * 1e3,
        best_open,
        gb / best_open,
        gib / best_open
    );
    println!(
        "target: seal >= 0.9 GB/s -> {}",
        if gb / best_seal >= 0.9 {
            "met"
        } else {
            "NOT met"
        }
    );
}
