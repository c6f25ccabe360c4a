#![no_main]
mod ingest_common;

// Arrow IPC file and stream: the second byte picks which.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let format = if data[1] & 1 == 0 {
        escrow_store::ingest::Format::ArrowFile
    } else {
        escrow_store::ingest::Format::ArrowStream
    };
    ingest_common::run(format, &[&data[..1], &data[2..]].concat());
});
