//! The sealed-file format: a plaintext byte stream cut into fixed-size segments, each sealed
//! with AES-256-GCM under the file's own data key and bound to its place.
//!
//! ```text
//! header (46 bytes, in the AAD of every segment):
//!   magic "ESCROWSL" | format u16 = 1 | segment_size u32 | dataset id [16] | version id [16]
//! segment i (i = 0, 1, ...): AES-256-GCM(dek, nonce_i, aad_i, plaintext_i) || tag (16 bytes)
//!   plaintext_i is exactly segment_size bytes, except the last one (0..=segment_size bytes)
//!   nonce_i = i as u64 big-endian || last as u32 big-endian
//!   aad_i   = header || i as u64 big-endian || last as u8
//! ```
//!
//! Binding the header, the index and the last flag means that reordering or dropping
//! segments, truncating the file (at a segment boundary or not), appending to it, splicing
//! segments from another file or swapping whole files all fail authentication. The data key
//! is unique per dataset version, so the counter nonce never repeats under one key.

use std::io::{self, Read, Write};

use super::cipher::{Aead, CipherError, TAG_LEN};
use crate::fsutil::read_full;

/// File magic of a sealed file.
pub const MAGIC: &[u8; 8] = b"ESCROWSL";
/// Current format version.
pub const FORMAT_VERSION: u16 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 8 + 2 + 4 + 16 + 16;
/// Default plaintext bytes per segment: the unit a read decrypts. Small enough that a
/// question reading a few columns of a version (`crate::projected`) decrypts little beyond
/// them (a column of one record batch is typically 0.1 to a few MiB), large enough that the
/// 16-byte tag and the per-segment call cost nothing (0.02%).
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 << 10;

/// Threads one large read of a [`SealedRandomAccess`] decrypts on.
const READ_THREADS: usize = 2;

/// Segments below which a read stays on one thread (a thread costs tens of microseconds; a
/// segment of the default size takes about as long to decrypt).
const MIN_SEGMENTS_PER_THREAD: u64 = 4;
/// Segment sizes a reader accepts (a header is not trusted to make us allocate a lot).
const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1..=(16 << 20);

/// What a sealed file is bound to: the dataset and the version (both random 128-bit ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub dataset: [u8; 16],
    pub version: [u8; 16],
}

fn header(binding: &Binding, segment_size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    h[10..14].copy_from_slice(&segment_size.to_be_bytes());
    h[14..30].copy_from_slice(&binding.dataset);
    h[30..46].copy_from_slice(&binding.version);
    h
}

fn nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[8..].copy_from_slice(&u32::from(last).to_be_bytes());
    n
}

fn aad(header: &[u8; HEADER_LEN], index: u64, last: bool) -> [u8; HEADER_LEN + 9] {
    let mut a = [0u8; HEADER_LEN + 9];
    a[..HEADER_LEN].copy_from_slice(header);
    a[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&index.to_be_bytes());
    a[HEADER_LEN + 8] = u8::from(last);
    a
}

fn integrity_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, IntegrityError(what.into()))
}

/// The error inside an `io::Error` when sealed data fails authentication.
#[derive(Debug, thiserror::Error)]
#[error("sealed data failed authentication: {0}")]
pub struct IntegrityError(pub String);

/// True if an `io::Error` came from a failed authentication (as opposed to plain I/O).
pub fn is_integrity_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<IntegrityError>())
}

/// Streams plaintext in, sealed segments out. Call [`SealWriter::finish`]: a writer that is
/// dropped unfinished leaves a file without a last segment, which no reader accepts.
pub struct SealWriter<W: Write> {
    inner: W,
    aead: Aead,
    header: [u8; HEADER_LEN],
    segment_size: usize,
    index: u64,
    buf: Vec<u8>,
    plaintext_bytes: u64,
    sealed_bytes: u64,
}

impl<W: Write> SealWriter<W> {
    /// Start a sealed file: writes the header at once.
    pub fn new(mut inner: W, dek: &[u8], binding: Binding, segment_size: u32) -> io::Result<Self> {
        let aead = Aead::new(dek).map_err(io::Error::other)?;
        if !SEGMENT_SIZE_RANGE.contains(&segment_size) {
            return Err(io::Error::other("segment size out of range"));
        }
        let header = header(&binding, segment_size);
        inner.write_all(&header)?;
        Ok(SealWriter {
            inner,
            aead,
            header,
            segment_size: segment_size as usize,
            index: 0,
            buf: Vec::with_capacity(segment_size as usize + TAG_LEN),
            plaintext_bytes: 0,
            sealed_bytes: HEADER_LEN as u64,
        })
    }

    fn seal_segment(&mut self, last: bool) -> io::Result<()> {
        let n = nonce(self.index, last);
        let a = aad(&self.header, self.index, last);
        self.aead
            .seal_in_place(&n, &a, &mut self.buf)
            .map_err(io::Error::other)?;
        self.inner.write_all(&self.buf)?;
        self.sealed_bytes += self.buf.len() as u64;
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Seal the last segment and return the inner writer, plaintext and sealed byte counts.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.seal_segment(true)?;
        self.inner.flush()?;
        Ok((self.inner, self.plaintext_bytes, self.sealed_bytes))
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            // A full buffer is sealed only once more data arrives: only then is it known
            // not to be the last segment.
            if self.buf.len() == self.segment_size {
                self.seal_segment(false)?;
            }
            let take = (self.segment_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        self.plaintext_bytes += total as u64;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Buffered plaintext stays buffered: segments are cut at fixed sizes only.
        self.inner.flush()
    }
}

/// Reads a sealed file back as plaintext, verifying every segment before releasing any of
/// its bytes. Any failure (tag, truncation, trailing data, wrong binding) is permanent: the
/// reader refuses all further reads, so a caller can never see data past a bad segment.
pub struct OpenReader<R: Read> {
    inner: R,
    aead: Aead,
    header: [u8; HEADER_LEN],
    segment_size: usize,
    index: u64,
    /// Plaintext of the current segment and how much of it was handed out.
    plain: Vec<u8>,
    pos: usize,
    /// One byte read ahead to tell whether a full segment is the last one.
    lookahead: Option<u8>,
    state: ReadState,
}

#[derive(Debug, PartialEq, Eq)]
enum ReadState {
    Reading,
    Done,
    Failed,
}

impl<R: Read> OpenReader<R> {
    /// Open a sealed file expected to be bound to `binding`.
    pub fn new(mut inner: R, dek: &[u8], binding: Binding) -> io::Result<Self> {
        let aead = Aead::new(dek).map_err(io::Error::other)?;
        let mut h = [0u8; HEADER_LEN];
        read_full(&mut inner, &mut h).and_then(|n| {
            if n == HEADER_LEN {
                Ok(())
            } else {
                Err(integrity_error("truncated header"))
            }
        })?;
        if &h[..8] != MAGIC {
            return Err(integrity_error("not a sealed file"));
        }
        if u16::from_be_bytes([h[8], h[9]]) != FORMAT_VERSION {
            return Err(integrity_error("unknown format version"));
        }
        let segment_size = u32::from_be_bytes([h[10], h[11], h[12], h[13]]);
        if !SEGMENT_SIZE_RANGE.contains(&segment_size) {
            return Err(integrity_error("bad segment size"));
        }
        if h != header(&binding, segment_size) {
            return Err(integrity_error("file is bound to another dataset version"));
        }
        Ok(OpenReader {
            inner,
            aead,
            header: h,
            segment_size: segment_size as usize,
            index: 0,
            plain: Vec::with_capacity(segment_size as usize + TAG_LEN),
            pos: 0,
            lookahead: None,
            state: ReadState::Reading,
        })
    }

    fn next_segment(&mut self) -> io::Result<()> {
        let want = self.segment_size + TAG_LEN;
        self.plain.clear();
        self.plain.resize(want, 0);
        let mut got = 0;
        if let Some(b) = self.lookahead.take() {
            self.plain[0] = b;
            got = 1;
        }
        got += read_full(&mut self.inner, &mut self.plain[got..])?;
        let last = if got < want {
            true
        } else {
            let mut one = [0u8; 1];
            match read_full(&mut self.inner, &mut one)? {
                0 => true,
                _ => {
                    self.lookahead = Some(one[0]);
                    false
                }
            }
        };
        self.plain.truncate(got);
        if got < TAG_LEN {
            return Err(integrity_error(format!("segment {} truncated", self.index)));
        }
        let n = nonce(self.index, last);
        let a = aad(&self.header, self.index, last);
        self.aead
            .open_in_place(&n, &a, &mut self.plain)
            .map_err(|e| match e {
                CipherError::Auth | CipherError::Truncated => {
                    integrity_error(format!("segment {} does not authenticate", self.index))
                }
                other => io::Error::other(other),
            })?;
        self.pos = 0;
        self.index += 1;
        if last {
            self.state = ReadState::Done;
        }
        Ok(())
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.state == ReadState::Failed {
                return Err(integrity_error("reader failed earlier"));
            }
            if self.pos < self.plain.len() {
                let n = (self.plain.len() - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.state == ReadState::Done || out.is_empty() {
                return Ok(0);
            }
            if let Err(e) = self.next_segment() {
                self.state = ReadState::Failed;
                self.plain.clear();
                return Err(e);
            }
        }
    }
}

/// Random access to a sealed file (for formats that need it, such as Parquet footers).
/// Every segment is authenticated, with its index and last flag, before any byte of it is
/// returned; the last segment is known from the file length, so truncation at a segment
/// boundary still fails (the new last segment was sealed as not-last).
///
/// Reads of many segments decrypt them on several threads: a first question reads whole
/// columns of a million rows, and AES-GCM at one core's speed was most of its time.
pub struct SealedRandomAccess {
    file: std::fs::File,
    aead: Aead,
    header: [u8; HEADER_LEN],
    segment_size: u64,
    segments: u64,
    plaintext_len: u64,
    /// The segment decrypted last, by index: readers often ask for it again (Parquet reads
    /// a page header, walked first, then the page's data, mostly from one segment).
    last: std::sync::Mutex<Option<(u64, std::sync::Arc<Vec<u8>>)>>,
}

impl SealedRandomAccess {
    pub fn open(file: std::fs::File, dek: &[u8], binding: Binding) -> io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let aead = Aead::new(dek).map_err(io::Error::other)?;
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| integrity_error("truncated header"))?;
        let segment_size = u32::from_be_bytes([h[10], h[11], h[12], h[13]]);
        if &h[..8] != MAGIC
            || !SEGMENT_SIZE_RANGE.contains(&segment_size)
            || h != header(&binding, segment_size)
        {
            return Err(integrity_error("header does not match"));
        }
        let body = file.metadata()?.len() - HEADER_LEN as u64;
        let full = u64::from(segment_size) + TAG_LEN as u64;
        let (n_full, rem) = (body / full, body % full);
        let (segments, plaintext_len) = match rem {
            0 if n_full > 0 => (n_full, n_full * u64::from(segment_size)),
            // An empty last segment follows no full one: the writer seals a full last
            // segment as the last (a file cut at a boundary with a tag appended is refused).
            r if r >= TAG_LEN as u64 && !(r == TAG_LEN as u64 && n_full > 0) => (
                n_full + 1,
                n_full * u64::from(segment_size) + r - TAG_LEN as u64,
            ),
            _ => {
                return Err(integrity_error(
                    "file length does not fit the segment layout",
                ));
            }
        };
        Ok(SealedRandomAccess {
            file,
            aead,
            header: h,
            segment_size: u64::from(segment_size),
            segments,
            plaintext_len,
            last: std::sync::Mutex::new(None),
        })
    }

    /// Plaintext length.
    pub fn len(&self) -> u64 {
        self.plaintext_len
    }

    pub fn is_empty(&self) -> bool {
        self.plaintext_len == 0
    }

    /// Plaintext bytes per segment: the unit every read decrypts and authenticates.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// One segment's plaintext: the one decrypted last, or decrypted now.
    fn segment(&self, index: u64) -> io::Result<std::sync::Arc<Vec<u8>>> {
        let last = || self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((i, seg)) = last().as_ref()
            && *i == index
        {
            return Ok(seg.clone());
        }
        let seg = std::sync::Arc::new(self.decrypt_segment(index)?);
        *last() = Some((index, seg.clone()));
        Ok(seg)
    }

    /// Decrypt segment `index` into `out` (exactly its plaintext length).
    fn decrypt_segment_into(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let last = index + 1 == self.segments;
        let offset = HEADER_LEN as u64 + index * (self.segment_size + TAG_LEN as u64);
        let mut tag = [0u8; TAG_LEN];
        self.file.read_exact_at(out, offset)?;
        self.file
            .read_exact_at(&mut tag, offset + out.len() as u64)?;
        self.aead
            .open_detached(
                &nonce(index, last),
                &aad(&self.header, index, last),
                out,
                &tag,
            )
            .map_err(|_| integrity_error(format!("segment {index} does not authenticate")))
    }

    /// Decrypt one segment.
    fn decrypt_segment(&self, index: u64) -> io::Result<Vec<u8>> {
        let start = index * self.segment_size;
        let end = (start + self.segment_size).min(self.plaintext_len);
        let mut buf = vec![0u8; (end - start) as usize];
        self.decrypt_segment_into(index, &mut buf)?;
        Ok(buf)
    }

    /// Plaintext bytes `start..start + len` (clamped to the end).
    pub fn read_range(&self, start: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = start.saturating_add(len).min(self.plaintext_len);
        if start > end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        let mut out = vec![0u8; (end - start) as usize];
        self.read_into(start, &mut out)?;
        Ok(out)
    }

    /// Fill `out` with the plaintext from `start`; an error if the file ends first. Only the
    /// segments `out` covers are read and authenticated. A read of many segments decrypts
    /// them on [`READ_THREADS`] threads, each a run of whole segments of `out`.
    pub fn read_into(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let end = start.saturating_add(out.len() as u64);
        if end > self.plaintext_len {
            return Err(integrity_error("a read past the end of the sealed data"));
        }
        let (first, last) = (start / self.segment_size, end.div_ceil(self.segment_size));
        let threads = READ_THREADS.min(((last - first) / MIN_SEGMENTS_PER_THREAD) as usize);
        if threads < 2 {
            return self.read_run(start, out);
        }
        // Split `out` at segment boundaries into `threads` runs of about as many segments, the
        // last read on this thread.
        let per = (last - first).div_ceil(threads as u64);
        std::thread::scope(|scope| {
            let mut rest = out;
            let mut pos = start;
            let mut handles = Vec::with_capacity(threads);
            let mut here = Ok(());
            while !rest.is_empty() {
                let cut = ((pos / self.segment_size + per) * self.segment_size).min(end);
                let (run, more) = rest.split_at_mut((cut - pos) as usize);
                let at = pos;
                match more.is_empty() {
                    true => here = self.read_run(at, run),
                    false => handles.push(scope.spawn(move || self.read_run(at, run))),
                }
                rest = more;
                pos = cut;
            }
            (handles.into_iter()).try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a reading thread")))
            })?;
            here
        })
    }

    /// [`Self::read_into`] on this thread. A segment `out` covers whole is read and
    /// decrypted in place there; the segments at its ends go through [`Self::segment`] (the
    /// neighbouring read, of the next column say, often starts in the same one).
    fn read_run(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let end = start + out.len() as u64;
        let mut pos = start;
        while pos < end {
            let index = pos / self.segment_size;
            let (seg_start, seg_end) = (
                index * self.segment_size,
                ((index + 1) * self.segment_size).min(self.plaintext_len),
            );
            if pos == seg_start && seg_end <= end {
                let at = (pos - start) as usize;
                self.decrypt_segment_into(
                    index,
                    &mut out[at..at + (seg_end - seg_start) as usize],
                )?;
                pos = seg_end;
                continue;
            }
            let seg = self.segment(index)?;
            let from = (pos - index * self.segment_size) as usize;
            let to = ((end - index * self.segment_size) as usize).min(seg.len());
            let at = (pos - start) as usize;
            out[at..at + to - from].copy_from_slice(&seg[from..to]);
            pos += (to - from) as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [42u8; 32];
    const B: Binding = Binding {
        dataset: [1; 16],
        version: [2; 16],
    };

    fn seal(data: &[u8], seg: u32) -> Vec<u8> {
        let mut w = SealWriter::new(Vec::new(), &KEY, B, seg).expect("writer");
        w.write_all(data).expect("write");
        let (out, plain, sealed) = w.finish().expect("finish");
        assert_eq!(plain, data.len() as u64);
        assert_eq!(sealed, out.len() as u64);
        out
    }

    fn open(file: &[u8], binding: Binding) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        OpenReader::new(file, &KEY, binding)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_boundary() {
        for n in [0, 1, 15, 16, 17, 63, 64, 65, 128, 129, 1000] {
            let d = data(n);
            assert_eq!(open(&seal(&d, 64), B).expect("open"), d, "len {n}");
        }
    }

    #[test]
    fn every_tampering_fails() {
        let d = data(64 * 5 + 10);
        let f = seal(&d, 64);
        let seg = 64 + TAG_LEN;
        let fails = |bytes: &[u8], why: &str| {
            let e = open(bytes, B).expect_err(why);
            assert!(is_integrity_error(&e), "{why}: {e}");
        };
        // flip one bit anywhere after the header
        for at in [HEADER_LEN, HEADER_LEN + 70, f.len() - 1] {
            let mut t = f.clone();
            t[at] ^= 1;
            fails(&t, "bit flip");
        }
        // swap segments 1 and 2
        let mut t = f.clone();
        let (s1, s2) = (HEADER_LEN + seg, HEADER_LEN + 2 * seg);
        let one = t[s1..s1 + seg].to_vec();
        t.copy_within(s2..s2 + seg, s1);
        t[s2..s2 + seg].copy_from_slice(&one);
        fails(&t, "swap");
        // truncate at a segment boundary and in the middle
        fails(&f[..HEADER_LEN + 3 * seg], "truncate at boundary");
        fails(&f[..f.len() - 5], "truncate mid segment");
        fails(&f[..HEADER_LEN], "only header");
        // append data
        let mut t = f.clone();
        t.extend_from_slice(&[0u8; 20]);
        fails(&t, "appended");
        // the same file presented as another version
        let other = Binding {
            dataset: B.dataset,
            version: [3; 16],
        };
        assert!(open(&f, other).is_err());
        // splice: segment 1 of another version's file (same key even) does not fit
        let g = {
            let mut w = SealWriter::new(Vec::new(), &KEY, other, 64).expect("w");
            w.write_all(&d).expect("w");
            w.finish().expect("f").0
        };
        let mut t = f.clone();
        t[s1..s1 + seg].copy_from_slice(&g[s1..s1 + seg]);
        fails(&t, "splice");
    }

    #[test]
    fn random_access_matches_and_detects_tampering() {
        let dir = tempfile::tempdir().expect("tmp");
        for n in [1usize, 63, 64, 65, 64 * 4, 64 * 4 + 7] {
            let d = data(n);
            let f = seal(&d, 64);
            let p = dir.path().join(format!("f{n}"));
            std::fs::write(&p, &f).expect("write");
            let ra = SealedRandomAccess::open(std::fs::File::open(&p).expect("open"), &KEY, B)
                .expect("ra");
            assert_eq!(ra.len(), n as u64);
            for (s, l) in [(0u64, n as u64), (n as u64 / 2, 70), (n as u64 - 1, 1)] {
                let got = ra.read_range(s, l).expect("range");
                let end = (s + l).min(n as u64) as usize;
                assert_eq!(got, d[s as usize..end], "n={n} range {s}+{l}");
            }
            if n > 64 {
                // cut at a segment boundary: the new last segment was not sealed as last
                std::fs::write(&p, &f[..HEADER_LEN + 64 + TAG_LEN]).expect("write");
                let ra = SealedRandomAccess::open(std::fs::File::open(&p).expect("open"), &KEY, B)
                    .expect("ra");
                assert!(ra.read_range(0, 10).is_err(), "n={n}");
            }
        }
    }

    #[test]
    fn reads_of_many_segments_split_across_threads_match_and_authenticate() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = 64 * 40 + 13;
        let d = data(n);
        let mut f = seal(&d, 64);
        let p = dir.path().join("many");
        std::fs::write(&p, &f).expect("write");
        let ra =
            SealedRandomAccess::open(std::fs::File::open(&p).expect("open"), &KEY, B).expect("ra");
        // Reads of 8 or more segments go to several threads: runs cut at segment
        // boundaries, starting and ending inside a segment or on its edge.
        for (s, l) in [
            (0u64, n as u64),
            (5, 64 * 8),
            (64, 64 * 8),
            (63, 64 * 30 + 2),
            (100, 2000),
        ] {
            let got = ra.read_range(s, l).expect("range");
            let end = (s + l).min(n as u64) as usize;
            assert_eq!(got, d[s as usize..end], "range {s}+{l}");
        }
        // One tampered segment deep inside a long read fails the whole read.
        f[HEADER_LEN + 25 * (64 + TAG_LEN) + 9] ^= 1;
        std::fs::write(&p, &f).expect("write");
        let ra =
            SealedRandomAccess::open(std::fs::File::open(&p).expect("open"), &KEY, B).expect("ra");
        assert!(ra.read_range(0, n as u64).is_err());
        assert!(ra.read_range(64 * 20, 64 * 10).is_err());
        assert!(ra.read_range(0, 64 * 20).is_ok());
    }

    #[test]
    fn reader_stays_failed() {
        let d = data(64 * 3);
        let mut f = seal(&d, 64);
        let at = HEADER_LEN + (64 + TAG_LEN) + 3;
        f[at] ^= 0x80;
        let mut r = OpenReader::new(&f[..], &KEY, B).expect("header ok");
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).expect("first segment is fine"), 64);
        assert!(r.read(&mut buf).is_err());
        assert!(r.read(&mut buf).is_err(), "a failed reader must not resume");
    }
}
