//! Arrow IPC, file or stream: every message's size and buffers checked before it is
//! allocated or decoded.

use super::*;

const CONTINUATION: [u8; 4] = [0xff; 4];
const ARROW_MAGIC: &[u8; 6] = b"ARROW1";

fn ipc_error(msg: impl std::fmt::Display) -> Error {
    Error::bad("malformed_arrow", format!("malformed Arrow IPC: {msg}"))
}

/// Hands arrow's `StreamReader` a re-framed copy of the upload, one message at a time, after
/// checking each message's declared sizes (so a hostile header cannot make the reader
/// allocate gigabytes) and, at the end, the stream or file trailer. Arrow does the decoding
/// and validation of the data itself.
struct CheckedMessages<R> {
    input: BufReader<R>,
    format: Format,
    max_body: usize,
    max_metadata: usize,
    record_batches: usize,
    current: Vec<u8>,
    pos: usize,
    finished: bool,
    /// The precise error behind an `io::Error` handed to arrow (shared with `IpcBatches`).
    error: Rc<RefCell<Option<Error>>>,
}

impl<R: Read> CheckedMessages<R> {
    fn new(
        mut input: BufReader<R>,
        format: Format,
        limits: &IngestLimits,
        error: Rc<RefCell<Option<Error>>>,
    ) -> Result<Self> {
        if format == Format::ArrowFile {
            let mut magic = [0u8; 8];
            read_exact_or(&mut input, &mut magic, "file shorter than its magic")?;
            if &magic[..6] != ARROW_MAGIC {
                return Err(ipc_error("not an Arrow IPC file (bad magic)"));
            }
            // Writers may pad the magic further to their alignment (arrow-rs: 64 bytes).
            // The first message of a file is its schema, never an end-of-stream marker, so
            // leading zero words are padding.
            let mut padding = 0;
            loop {
                let buf = input.fill_buf().map_err(io_to_input_error)?;
                if padding >= 56 || buf.len() < 8 || buf[..8] != [0u8; 8] {
                    break;
                }
                input.consume(8);
                padding += 8;
            }
        }
        Ok(CheckedMessages {
            input,
            format,
            max_body: limits.max_ipc_body,
            max_metadata: limits.max_ipc_metadata,
            record_batches: 0,
            current: Vec::new(),
            pos: 0,
            finished: false,
            error,
        })
    }

    /// The next message, re-framed with a continuation marker; `None` at the end.
    fn next_message(&mut self) -> Result<Option<Vec<u8>>> {
        let mut word = [0u8; 4];
        let n = read_up_to(&mut self.input, &mut word)?;
        if n == 0 {
            return match self.format {
                // A stream may end without an end-of-stream marker.
                Format::ArrowStream => Ok(None),
                _ => Err(ipc_error("file ends before its footer")),
            };
        }
        if n < 4 {
            return Err(ipc_error("truncated message header"));
        }
        if word == CONTINUATION {
            read_exact_or(&mut self.input, &mut word, "truncated message header")?;
        }
        let meta_len = i32::from_le_bytes(word);
        if meta_len == 0 {
            return Ok(None);
        }
        if meta_len < 0 || meta_len as usize > self.max_metadata {
            return Err(ipc_error("message header length out of range"));
        }
        let meta_len = meta_len as usize;
        let mut framed = Vec::with_capacity(8 + meta_len);
        framed.extend_from_slice(&CONTINUATION);
        framed.extend_from_slice(word.as_slice());
        framed.resize(8 + meta_len, 0);
        read_exact_or(
            &mut self.input,
            &mut framed[8..],
            "truncated message header",
        )?;
        let message = arrow_ipc::root_as_message(&framed[8..])
            .map_err(|_| ipc_error("invalid message header"))?;
        let body_len = message.bodyLength();
        if body_len < 0 || body_len as u64 > self.max_body as u64 {
            return Err(ipc_error(format!(
                "a message body of {body_len} bytes is over the {} byte limit per record batch",
                self.max_body
            )));
        }
        if message.header_type() == arrow_ipc::MessageHeader::RecordBatch {
            self.record_batches += 1;
        }
        let compressed = compressed_buffers(&message);
        let body_len = body_len as usize;
        framed.reserve_exact(body_len);
        framed.resize(8 + meta_len + body_len, 0);
        read_exact_or(
            &mut self.input,
            &mut framed[8 + meta_len..],
            "truncated message body",
        )?;
        self.check_uncompressed_lengths(&compressed, &framed[8 + meta_len..])?;
        Ok(Some(framed))
    }

    /// Each compressed buffer starts with its uncompressed length, which arrow allocates
    /// before decompressing: a forged length would make it ask for exabytes, and a failed
    /// allocation aborts the process (found by fuzz/ingest_arrow). The lengths of a batch
    /// must add up to at most the per-batch limit; -1 marks a buffer stored uncompressed.
    fn check_uncompressed_lengths(&self, buffers: &[(i64, i64)], body: &[u8]) -> Result<()> {
        let mut total: u64 = 0;
        for &(offset, length) in buffers {
            let start = usize::try_from(offset).ok();
            let prefix = start.and_then(|s| body.get(s..s.checked_add(8)?));
            // (empty buffers have no prefix; one outside the body is arrow's to refuse)
            let Some(prefix) = prefix.filter(|_| length >= 8) else {
                continue;
            };
            let declared = i64::from_le_bytes(prefix.try_into().unwrap_or([0; 8]));
            match declared {
                -1 => {}
                n if n < 0 => {
                    return Err(ipc_error("a compressed buffer declares a negative length"));
                }
                n => total = total.saturating_add(n as u64),
            }
        }
        if total > self.max_body as u64 {
            return Err(ipc_error(format!(
                "a record batch of {total} bytes uncompressed is over the {} byte limit per record batch",
                self.max_body
            )));
        }
        Ok(())
    }

    /// After the end-of-stream marker: a stream must end; a file must end with a footer
    /// that agrees with what was read.
    fn check_trailer(&mut self) -> Result<()> {
        let mut rest = Vec::new();
        (&mut self.input)
            .take(self.max_metadata as u64 + 11)
            .read_to_end(&mut rest)
            .map_err(io_to_input_error)?;
        if self.format == Format::ArrowStream {
            return if rest.is_empty() {
                Ok(())
            } else {
                Err(ipc_error("data after the end of the stream"))
            };
        }
        if rest.len() < 10 || &rest[rest.len() - 6..] != ARROW_MAGIC {
            return Err(ipc_error("missing or truncated footer"));
        }
        let len_at = rest.len() - 10;
        let footer_len = i32::from_le_bytes([
            rest[len_at],
            rest[len_at + 1],
            rest[len_at + 2],
            rest[len_at + 3],
        ]);
        // The footer may be preceded by alignment padding.
        if footer_len < 0
            || footer_len as usize > len_at
            || rest[..len_at - footer_len as usize].iter().any(|&b| b != 0)
        {
            return Err(ipc_error("footer length does not match"));
        }
        let footer = arrow_ipc::root_as_footer(&rest[len_at - footer_len as usize..len_at])
            .map_err(|_| ipc_error("invalid footer"))?;
        let blocks = footer.recordBatches().map_or(0, |b| b.len());
        if blocks != self.record_batches {
            return Err(ipc_error(
                "footer does not match the record batches in the file",
            ));
        }
        Ok(())
    }

    fn refill(&mut self) -> Result<()> {
        self.pos = 0;
        match self.next_message()? {
            Some(m) => self.current = m,
            None => {
                self.check_trailer()?;
                self.current = [CONTINUATION, [0u8; 4]].concat();
                self.finished = true;
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for CheckedMessages<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.current.len() {
            if self.finished {
                return Ok(0);
            }
            if let Err(e) = self.refill() {
                self.error.borrow_mut().get_or_insert(e);
                return Err(io::Error::other("upload refused"));
            }
        }
        let n = (self.current.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// (offset, length) in the body of each buffer of a compressed record or dictionary batch.
fn compressed_buffers(message: &arrow_ipc::Message) -> Vec<(i64, i64)> {
    let batch = message
        .header_as_record_batch()
        .or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
    match batch {
        Some(b) if b.compression().is_some() => b
            .buffers()
            .map(|bs| bs.iter().map(|b| (b.offset(), b.length())).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Record batches of an Arrow IPC upload.
pub(super) struct IpcBatches<R: Read> {
    reader: arrow_ipc::reader::StreamReader<CheckedMessages<R>>,
    error: Rc<RefCell<Option<Error>>>,
    yielded: bool,
    done: bool,
}

impl<R: Read> IpcBatches<R> {
    pub(super) fn new(input: BufReader<R>, format: Format, limits: &IngestLimits) -> Result<Self> {
        let error = Rc::new(RefCell::new(None));
        let messages = CheckedMessages::new(input, format, limits, error.clone())?;
        let reader = arrow_ipc::reader::StreamReader::try_new(messages, None).map_err(|e| {
            error
                .borrow_mut()
                .take()
                .unwrap_or_else(|| ipc_error(strip(e)))
        })?;
        Ok(IpcBatches {
            reader,
            error,
            yielded: false,
            done: false,
        })
    }
}

impl<R: Read> Iterator for IpcBatches<R> {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.reader.next();
        let precise = self.error.borrow_mut().take();
        match (item, precise) {
            (_, Some(e)) => {
                self.done = true;
                Some(Err(e))
            }
            (Some(Ok(b)), None) => {
                self.yielded = true;
                Some(Ok(b))
            }
            (Some(Err(e)), None) => {
                self.done = true;
                Some(Err(ipc_error(strip(e))))
            }
            (None, None) => {
                self.done = true;
                // A valid stream with a schema but no batches: surface the schema.
                (!self.yielded).then(|| Ok(RecordBatch::new_empty(self.reader.schema())))
            }
        }
    }
}

/// Arrow's messages describe structure (offsets, lengths, types), not values; keep the
/// variant's text but drop the variant name noise.
pub(super) fn strip(e: ArrowError) -> String {
    match e {
        ArrowError::IpcError(m)
        | ArrowError::InvalidArgumentError(m)
        | ArrowError::ParseError(m)
        | ArrowError::SchemaError(m)
        | ArrowError::ComputeError(m)
        | ArrowError::NotYetImplemented(m) => m.chars().take(200).collect(),
        ArrowError::IoError(..) => "read error".into(),
        other => other.to_string().chars().take(200).collect(),
    }
}

pub(super) fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    crate::fsutil::read_full(r, buf).map_err(io_to_input_error)
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    if read_up_to(r, buf)? == buf.len() {
        Ok(())
    } else {
        Err(ipc_error(what))
    }
}
