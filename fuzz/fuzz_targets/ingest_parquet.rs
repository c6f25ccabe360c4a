#![no_main]
mod ingest_common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ingest_common::run(escrow_store::ingest::Format::Parquet, data);
});
