//! Ingest: turn an uploaded byte stream (CSV, Arrow IPC file or stream, Parquet) into
//! validated Arrow record batches and write them, as one Arrow IPC stream, into a sink
//! (the sealing writer). Streaming: memory is bounded by one batch / one IPC message,
//! never by the upload size. No HTTP here; the server feeds it a blocking reader.
//!
//! Parsing is done by the arrow and parquet crates; this module adds only the bounds a
//! hostile upload needs (message size caps checked *before* allocating) and the
//! schema checks escrow relies on (named, unique columns; an existing key column).

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, RecordBatch};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, SchemaRef};

use parquet::arrow::arrow_reader::RowGroups;
use parquet::column::page::{PageIterator, PageReader};
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::reader::FileReader;

use crate::catalog::ColumnInfo;
use crate::matching::{COMPANY_KEY, MatchStats, NAME_KEY, Names, company_keys};
use crate::{Error, Result};

/// Upload formats escrow accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// CSV with a header row (CRM exports), UTF-8.
    Csv,
    /// Arrow IPC file (`ARROW1` magic, footer).
    ArrowFile,
    /// Arrow IPC stream.
    ArrowStream,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// Parse a format name as used in the API (`csv`, `arrow`, `arrow-stream`, `parquet`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "csv" => Ok(Format::Csv),
            "arrow" | "arrow-file" | "feather" => Ok(Format::ArrowFile),
            "arrow-stream" | "arrows" => Ok(Format::ArrowStream),
            "parquet" => Ok(Format::Parquet),
            _ => Err(Error::bad(
                "unknown_format",
                "format must be one of csv, arrow, arrow-stream, parquet",
            )),
        }
    }

    /// The error code for a file of this format that does not parse.
    pub fn error_code(self) -> &'static str {
        match self {
            Format::Csv => "malformed_csv",
            Format::ArrowFile | Format::ArrowStream => "malformed_arrow",
            Format::Parquet => "malformed_parquet",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::ArrowFile => "arrow",
            Format::ArrowStream => "arrow-stream",
            Format::Parquet => "parquet",
        }
    }

    /// Guess a format from the first bytes of an upload.
    pub fn sniff(prefix: &[u8]) -> Option<Self> {
        if prefix.starts_with(b"ARROW1") {
            return Some(Format::ArrowFile);
        }
        if prefix.starts_with(b"PAR1") {
            return Some(Format::Parquet);
        }
        if prefix.starts_with(&[0xff, 0xff, 0xff, 0xff]) {
            return Some(Format::ArrowStream);
        }
        looks_like_text(prefix).then_some(Format::Csv)
    }
}

/// UTF-8 (a character cut at the end of the sample is fine) without NUL or other C0
/// control bytes beyond tab/CR/LF.
fn looks_like_text(prefix: &[u8]) -> bool {
    let valid = match std::str::from_utf8(prefix) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && prefix.len() - e.valid_up_to() < 4,
    };
    valid
        && !prefix.is_empty()
        && prefix
            .iter()
            .all(|&b| b >= 0x20 || matches!(b, b'\t' | b'\r' | b'\n'))
}

/// Bounds applied while parsing untrusted uploads.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// Largest Arrow IPC message body (one record batch) accepted.
    pub max_ipc_body: usize,
    /// Largest Arrow IPC flatbuffer header.
    pub max_ipc_metadata: usize,
    /// Rows per batch when converting CSV/Parquet.
    pub batch_rows: usize,
    /// Bytes of CSV read ahead to infer column types.
    pub csv_infer_bytes: usize,
    /// Records of CSV used to infer column types.
    pub csv_infer_records: usize,
    /// Where formats that need random access (Parquet) spool the upload, sealed.
    pub spool_dir: Option<std::path::PathBuf>,
    /// Uncompressed bytes of Parquet pages held at once: the Arrow reader decodes one page
    /// per column at a time, and a page is decompressed whole to the size its header
    /// declares, so each page may declare at most this divided by the file's columns (and
    /// at most `max_parquet_page`). Bounds what a decompression bomb can take.
    pub parquet_page_budget: u64,
    /// Largest uncompressed Parquet page (writers' defaults are about 1 MiB).
    pub max_parquet_page: u64,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_ipc_body: 256 << 20,
            max_ipc_metadata: 16 << 20,
            batch_rows: 64 * 1024,
            csv_infer_bytes: 4 << 20,
            csv_infer_records: 10_000,
            spool_dir: None,
            parquet_page_budget: 1 << 30,
            max_parquet_page: 128 << 20,
        }
    }
}

/// What happened to the input stream underneath the parser, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFault {
    /// More bytes than the limit arrived.
    TooLarge(u64),
    /// The transport failed (client went away).
    Interrupted,
}

/// Wraps the upload reader: counts bytes, enforces the size limit and remembers transport
/// faults, so that a parse error caused by them is reported as what it really is.
pub struct TrackedInput<R> {
    inner: R,
    limit: u64,
    read: u64,
    state: Arc<Mutex<(u64, Option<InputFault>)>>,
}

/// Shared view of a [`TrackedInput`]'s byte count and fault.
#[derive(Clone)]
pub struct InputStatus(Arc<Mutex<(u64, Option<InputFault>)>>);

impl InputStatus {
    pub fn bytes(&self) -> u64 {
        self.0.lock().map(|s| s.0).unwrap_or(0)
    }
    pub fn fault(&self) -> Option<InputFault> {
        self.0.lock().ok().and_then(|s| s.1)
    }
}

impl<R: Read> TrackedInput<R> {
    pub fn new(inner: R, limit: u64) -> (Self, InputStatus) {
        let state = Arc::new(Mutex::new((0, None)));
        let status = InputStatus(state.clone());
        (
            TrackedInput {
                inner,
                limit,
                read: 0,
                state,
            },
            status,
        )
    }

    fn set_fault(&self, fault: InputFault) {
        if let Ok(mut s) = self.state.lock() {
            s.1.get_or_insert(fault);
        }
    }
}

impl<R: Read> Read for TrackedInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                if let Ok(mut s) = self.state.lock() {
                    s.0 = self.read;
                }
                if self.read > self.limit {
                    self.set_fault(InputFault::TooLarge(self.limit));
                    return Err(io::Error::other("upload over the size limit"));
                }
                crate::faults::at("upload.received", self.read)?;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.set_fault(InputFault::Interrupted);
                Err(e)
            }
        }
    }
}

/// Which column identifies a company, and how.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub column: Option<String>,
    /// Company names for rows without a usable website (website keys only).
    pub name_column: Option<String>,
    /// Columns whose values must agree as well when companies are matched by name (a
    /// country, a region): part of each row's name key.
    pub name_context: Vec<String>,
    pub key_type: KeyType,
}

/// How a key column is read.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Websites, matched as companies (docs/MATCHING.md).
    #[default]
    Website,
    /// Exact identifiers (DUNS, LEI, an agreed account id): compared as written. Integer key
    /// columns are always ids.
    Id,
}

impl KeyType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "website" => Ok(KeyType::Website),
            "id" => Ok(KeyType::Id),
            other => Err(Error::bad(
                "invalid_key_type",
                format!("unknown key type {other:?} (website or id)"),
            )),
        }
    }
}

/// The result of a successful ingest.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub format: Format,
    pub rows: u64,
    /// The uploaded columns (not the hidden company key).
    pub columns: Vec<ColumnInfo>,
    pub key_column: Option<String>,
    pub name_column: Option<String>,
    pub name_context: Vec<String>,
    /// The key type in effect (`None` without a key column).
    pub key_type: Option<KeyType>,
    /// For website keys: how rows were matched.
    pub matching: Option<MatchStats>,
}

/// Parse `input` as `format` (sniffed when `None`), check it, and write it into `sink` as an
/// Arrow IPC stream. On error nothing useful is in `sink`; the caller discards it.
pub fn ingest<'a, R: Read + 'a, W: Write>(
    format: Option<Format>,
    input: R,
    key: &KeySpec,
    sink: W,
    limits: &IngestLimits,
) -> Result<(Ingested, W)> {
    let mut input = input;
    let mut prefix = vec![0u8; 4096];
    let n = read_up_to(&mut input, &mut prefix)?;
    prefix.truncate(n);
    if prefix.is_empty() {
        return Err(Error::bad("empty_file", "the upload is empty"));
    }
    let format = match format {
        Some(f) => f,
        None => Format::sniff(&prefix).ok_or_else(|| {
            Error::bad(
                "unknown_format",
                "not CSV, Arrow IPC or Parquet (name the format explicitly if it is one of them)",
            )
        })?,
    };
    let input = BufReader::with_capacity(256 << 10, Cursor::new(prefix).chain(input));
    // The decoders are arrow's and parquet's; some malformed files make them panic (see the
    // Arrow fuzz corpus). A panic while decoding an upload is a refusal of that upload, not
    // a crash: nothing of it is committed, and the server goes on.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_into(format, input, key, sink, limits)
    }));
    decoded.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        tracing::warn!(
            format = format.as_str(),
            panic = what,
            "decoder panicked on an upload; refused"
        );
        Err(Error::bad(
            format.error_code(),
            format!(
                "the {} decoder rejected the file as malformed",
                format.as_str()
            ),
        ))
    })
}

fn decode_into<'a, R: Read + 'a, W: Write>(
    format: Format,
    input: BufReader<R>,
    key: &KeySpec,
    sink: W,
    limits: &IngestLimits,
) -> Result<(Ingested, W)> {
    let mut batches: Box<dyn Iterator<Item = Result<RecordBatch>> + 'a> = match format {
        Format::Csv => csv_batches(input, limits)?,
        Format::ArrowFile | Format::ArrowStream => {
            Box::new(IpcBatches::new(input, format, limits)?)
        }
        Format::Parquet => parquet_batches(input, limits)?,
    };
    // The schema comes with the first item for CSV/Parquet and from the stream header for IPC;
    // take it from the first batch, which every path yields before any data is written.
    let first = match batches.next() {
        Some(b) => b?,
        None => return Err(Error::bad("no_rows", "the upload has no rows")),
    };
    let schema = first.schema();
    let key_column = key.column.as_deref();
    let columns = check_schema(&schema, key_column)?;
    let key_type = key_column.map(|k| match schema.field_with_name(k).map(|f| f.data_type()) {
        Ok(t) if is_text(t) => key.key_type,
        _ => KeyType::Id,
    });
    if !key.name_context.is_empty() && key.name_column.is_none() {
        return Err(Error::bad(
            "invalid_name_context",
            "name-context columns qualify a name column: give --name-column too",
        ));
    }
    // Website keys: hidden company-key (and name-key) columns are computed per row and
    // sealed with the data.
    let company = match (key_column, key_type) {
        (Some(k), Some(KeyType::Website)) => {
            let name = key
                .name_column
                .as_deref()
                .map(|n| text_column(&schema, n))
                .transpose()?;
            let context = key
                .name_context
                .iter()
                .map(|c| context_column(&schema, c, key_column, key.name_column.as_deref()))
                .collect::<Result<Vec<_>>>()?;
            Some((schema.index_of(k).map_err(internal_arrow)?, name, context))
        }
        _ => {
            if key.name_column.is_some() {
                return Err(Error::bad(
                    "invalid_name_column",
                    "a name column is a fallback for a website key column: give --key-column (a text column of websites) too",
                ));
            }
            None
        }
    };
    let sealed_schema = match &company {
        Some((_, name, _)) => {
            let mut fields: Vec<arrow_schema::FieldRef> = schema.fields().iter().cloned().collect();
            let hidden = [Some(COMPANY_KEY), name.map(|_| NAME_KEY)];
            for column in hidden.into_iter().flatten() {
                fields.push(Arc::new(arrow_schema::Field::new(
                    column,
                    DataType::Utf8,
                    true,
                )));
            }
            Arc::new(arrow_schema::Schema::new_with_metadata(
                fields,
                schema.metadata().clone(),
            ))
        }
        None => schema.clone(),
    };
    let mut stats = MatchStats::default();
    let mut writer = StreamWriter::try_new(sink, &sealed_schema).map_err(internal_arrow)?;
    let mut rows = 0u64;
    for batch in std::iter::once(Ok(first)).chain(batches) {
        let batch = batch?;
        if batch.schema() != schema {
            return Err(Error::bad(
                "malformed_input",
                "record batches disagree on the schema",
            ));
        }
        rows += batch.num_rows() as u64;
        let batch = match &company {
            Some((k, name, context)) => {
                let context: Vec<&dyn Array> =
                    context.iter().map(|&c| batch.column(c).as_ref()).collect();
                let names = name.map(|n| Names {
                    name: batch.column(n).as_ref(),
                    context: &context,
                });
                let (keys, name_keys) = company_keys(batch.column(*k).as_ref(), names, &mut stats)
                    .map_err(internal_arrow)?;
                let mut cols = batch.columns().to_vec();
                cols.push(keys);
                cols.extend(name_keys);
                RecordBatch::try_new(sealed_schema.clone(), cols).map_err(internal_arrow)?
            }
            None => batch,
        };
        writer.write(&batch).map_err(sink_error)?;
    }
    if rows == 0 {
        return Err(Error::bad("no_rows", "the upload has no rows"));
    }
    writer.finish().map_err(sink_error)?;
    let sink = writer.into_inner().map_err(sink_error)?;
    Ok((
        Ingested {
            format,
            rows,
            columns,
            key_column: key_column.map(str::to_string),
            name_column: key.name_column.clone(),
            name_context: key.name_context.clone(),
            key_type,
            matching: company.map(|_| stats),
        },
        sink,
    ))
}

fn check_schema(schema: &SchemaRef, key_column: Option<&str>) -> Result<Vec<ColumnInfo>> {
    if schema.fields().is_empty() {
        return Err(Error::bad("no_columns", "the upload has no columns"));
    }
    let mut seen = HashSet::new();
    for f in schema.fields() {
        if f.name().trim().is_empty() {
            return Err(Error::bad("invalid_column", "a column has an empty name"));
        }
        if f.name().to_lowercase().starts_with("__escrow") {
            return Err(Error::bad(
                "reserved_column",
                format!(
                    "column names starting with __escrow are reserved ({:?})",
                    f.name()
                ),
            ));
        }
        if !seen.insert(f.name().to_lowercase()) {
            return Err(Error::bad(
                "duplicate_column",
                format!("column {:?} appears more than once", f.name()),
            ));
        }
    }
    if let Some(key) = key_column {
        let field = schema.field_with_name(key).map_err(|_| {
            Error::bad(
                "unknown_key_column",
                format!("key column {key:?} is not a column of the upload"),
            )
        })?;
        let value_type = match field.data_type() {
            DataType::Dictionary(_, v) => v.as_ref(),
            other => other,
        };
        let ok = matches!(
            value_type,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64
        );
        if !ok {
            return Err(Error::bad(
                "unsupported_key_type",
                format!(
                    "key column {key:?} must be text or integer, not {}",
                    field.data_type()
                ),
            ));
        }
    }
    Ok(schema
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect())
}

fn is_text(t: &DataType) -> bool {
    let t = match t {
        DataType::Dictionary(_, v) => v.as_ref(),
        other => other,
    };
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The index of a text column named by the uploader (the name column).
fn text_column(schema: &SchemaRef, name: &str) -> Result<usize> {
    let i = schema.index_of(name).map_err(|_| {
        Error::bad(
            "unknown_name_column",
            format!("name column {name:?} is not a column of the upload"),
        )
    })?;
    if !is_text(schema.field(i).data_type()) {
        return Err(Error::bad(
            "invalid_name_column",
            format!("name column {name:?} must be text"),
        ));
    }
    Ok(i)
}

/// The index of a name-context column: any column of the upload but the key and name.
fn context_column(
    schema: &SchemaRef,
    name: &str,
    key: Option<&str>,
    name_column: Option<&str>,
) -> Result<usize> {
    if Some(name) == key || Some(name) == name_column {
        return Err(Error::bad(
            "invalid_name_context",
            format!("{name:?} is the key or name column; a name context is another column"),
        ));
    }
    schema.index_of(name).map_err(|_| {
        Error::bad(
            "invalid_name_context",
            format!("name-context column {name:?} is not a column of the upload"),
        )
    })
}

fn internal_arrow(e: ArrowError) -> Error {
    Error::internal(format!("arrow: {e}"))
}

/// Errors writing into the sink are server-side (disk full, I/O).
fn sink_error(e: ArrowError) -> Error {
    match e {
        ArrowError::IoError(msg, io) => match Error::from(io) {
            Error::StorageFull(_) => Error::StorageFull(format!("writing sealed data: {msg}")),
            _ => Error::internal(format!("writing sealed data: {msg}")),
        },
        other => internal_arrow(other),
    }
}

/// An I/O error from the upload stream itself; the caller consults [`InputStatus`] to say
/// whether it was the size limit or a disconnect, this is the fallback.
fn io_to_input_error(_e: io::Error) -> Error {
    Error::Interrupted
}

// ---- CSV ---------------------------------------------------------------------------------

fn csv_batches<'a, R: Read + 'a>(
    mut input: BufReader<R>,
    limits: &IngestLimits,
) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + 'a>> {
    let mut prefix = Vec::new();
    (&mut input)
        .take(limits.csv_infer_bytes as u64)
        .read_to_end(&mut prefix)
        .map_err(io_to_input_error)?;
    // Infer on whole lines only, unless the sample is the whole file.
    let whole = prefix.len() < limits.csv_infer_bytes;
    let sample_end = if whole {
        prefix.len()
    } else {
        prefix
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(prefix.len(), |i| i + 1)
    };
    // Spreadsheet and CRM exports: a UTF-8 byte-order mark, and `;` or tab delimiters.
    let start = if prefix.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let delimiter = sniff_delimiter(&prefix[start..sample_end]);
    let format = arrow_csv::reader::Format::default()
        .with_header(true)
        .with_delimiter(delimiter);
    let (schema, _) = format
        .infer_schema(
            Cursor::new(&prefix[start..sample_end]),
            Some(limits.csv_infer_records),
        )
        .map_err(csv_error)?;
    let schema = Arc::new(schema);
    prefix.drain(..start);
    let reader = arrow_csv::ReaderBuilder::new(schema.clone())
        .with_header(true)
        .with_delimiter(delimiter)
        .with_batch_size(limits.batch_rows)
        .build(Cursor::new(prefix).chain(input))
        .map_err(csv_error)?;
    Ok(schema_even_if_empty(
        reader.map(|b| b.map_err(csv_error)),
        schema,
    ))
}

/// The delimiter of a CSV sample: whichever of `,` `;` tab occurs most in the header line
/// (outside quotes), comma on a tie.
fn sniff_delimiter(sample: &[u8]) -> u8 {
    let header = sample.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut counts = [(b',', 0usize), (b';', 0), (b'\t', 0)];
    let mut quoted = false;
    for &b in header {
        if b == b'"' {
            quoted = !quoted;
        } else if !quoted && let Some(c) = counts.iter_mut().find(|c| c.0 == b) {
            c.1 += 1;
        }
    }
    counts
        .iter()
        .fold((b',', 0), |best, &c| if c.1 > best.1 { c } else { best })
        .0
}

/// Batches of `iter`, or one empty batch of `schema` if it yields none, so that a file with
/// a header but no rows still has its schema checked (and is then refused as `no_rows`).
fn schema_even_if_empty<'a>(
    iter: impl Iterator<Item = Result<RecordBatch>> + 'a,
    schema: SchemaRef,
) -> Box<dyn Iterator<Item = Result<RecordBatch>> + 'a> {
    let mut iter = iter.peekable();
    let empty = iter
        .peek()
        .is_none()
        .then(|| Ok(RecordBatch::new_empty(schema)));
    Box::new(empty.into_iter().chain(iter))
}

/// CSV parse errors. Structural messages (field counts, invalid UTF-8, line numbers) are
/// passed on; messages that would quote a cell value are replaced by a generic one.
fn csv_error(e: ArrowError) -> Error {
    match e {
        ArrowError::CsvError(msg) if !msg.contains('\'') && !msg.contains('"') => {
            Error::bad("malformed_csv", format!("malformed CSV: {msg}"))
        }
        ArrowError::ParseError(_) | ArrowError::CastError(_) => Error::bad(
            "malformed_csv",
            "malformed CSV: a value does not match the column type inferred from the first rows",
        ),
        ArrowError::IoError(..) | ArrowError::ExternalError(_) => Error::Interrupted,
        _ => Error::bad("malformed_csv", "malformed CSV"),
    }
}

// ---- Arrow IPC ---------------------------------------------------------------------------

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
struct IpcBatches<R: Read> {
    reader: arrow_ipc::reader::StreamReader<CheckedMessages<R>>,
    error: Rc<RefCell<Option<Error>>>,
    yielded: bool,
    done: bool,
}

impl<R: Read> IpcBatches<R> {
    fn new(input: BufReader<R>, format: Format, limits: &IngestLimits) -> Result<Self> {
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
fn strip(e: ArrowError) -> String {
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

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    crate::fsutil::read_full(r, buf).map_err(io_to_input_error)
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    if read_up_to(r, buf)? == buf.len() {
        Ok(())
    } else {
        Err(ipc_error(what))
    }
}

// ---- Parquet ----------------------------------------------------------------------------

/// Segment size of the Parquet spool: each page header read decrypts one segment, so it is
/// smaller than the default (pages are often a few KB in files written with small pages).
const SPOOL_SEGMENT_SIZE: u32 = 64 << 10;

/// The widest fixed-length byte array column a Parquet upload may have (UUIDs are 16,
/// decimals at most 32).
const MAX_FIXED_LEN: i32 = 4096;

/// A Parquet upload needs random access (its footer is at the end), so it is first spooled
/// to a temp file sealed under a throwaway key that never leaves memory, then read back
/// through authenticated random access. Plaintext never touches the disk. parquet decodes
/// it behind checks of its footer and page headers ([`walk_thrift_struct`]), its column
/// widths and its pages ([`CheckedPages`]): bounds a hostile file needs that parquet does
/// not apply.
fn parquet_batches<'a, R: Read + 'a>(
    input: BufReader<R>,
    limits: &IngestLimits,
) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + 'a>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let pages = PageHeaderCheck::default();
    let source = SpooledBytes::open(Arc::new(spool(input, limits)?), pages.clone())?;
    let file: Arc<dyn FileReader> =
        Arc::new(SerializedFileReader::new(source).map_err(parquet_error)?);
    let meta = file.metadata().file_metadata();
    check_fixed_widths(meta.schema_descr())?;
    let columns = meta.schema_descr().num_columns().max(1) as u64;
    pages.max_page.store(
        (limits.parquet_page_budget / columns).min(limits.max_parquet_page),
        std::sync::atomic::Ordering::Relaxed,
    );
    let schema =
        parquet::arrow::parquet_to_arrow_schema(meta.schema_descr(), meta.key_value_metadata())
            .map_err(parquet_error)?;
    let levels = parquet::arrow::parquet_to_arrow_field_levels(
        meta.schema_descr(),
        parquet::arrow::ProjectionMask::all(),
        Some(schema.fields()),
    )
    .map_err(parquet_error)?;
    let refused = pages.refused.clone();
    let checked = CheckedRowGroups {
        file,
        refused: pages.refused,
    };
    let reader = ParquetRecordBatchReader::try_new_with_row_groups(
        &levels,
        &checked,
        limits.batch_rows,
        None,
    )
    .map_err(parquet_error)?;
    let schema = arrow_array::RecordBatchReader::schema(&reader);
    let batches = reader.map(move |b| {
        b.map_err(|e| {
            // the page checks' refusal, more precise than parquet's message about it
            let precise = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
            precise.unwrap_or_else(|| {
                Error::bad(
                    "malformed_parquet",
                    format!("malformed Parquet: {}", strip(e)),
                )
            })
        })
    });
    Ok(schema_even_if_empty(batches, schema))
}

/// The upload, spooled to a temp file sealed under a throwaway key, for random access.
fn spool<R: Read>(
    mut input: BufReader<R>,
    limits: &IngestLimits,
) -> Result<crate::crypto::seal::SealedRandomAccess> {
    use crate::crypto::seal::{Binding, SealWriter, SealedRandomAccess};

    let spool_dir = limits
        .spool_dir
        .as_ref()
        .ok_or_else(|| Error::internal("no spool directory configured for Parquet uploads"))?;
    let spool = tempfile::Builder::new()
        .prefix("spool-")
        .suffix(".partial")
        .tempfile_in(spool_dir)?;
    let key: [u8; 32] = crate::crypto::random_bytes()?;
    let key = zeroize::Zeroizing::new(key);
    let binding = Binding {
        dataset: crate::crypto::random_bytes()?,
        version: crate::crypto::random_bytes()?,
    };
    let mut writer = SealWriter::new(
        io::BufWriter::with_capacity(1 << 20, spool.as_file().try_clone()?),
        &key[..],
        binding,
        SPOOL_SEGMENT_SIZE,
    )?;
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_to_input_error(e)),
        };
        writer.write_all(&chunk[..n])?;
    }
    let (buffered, _, _) = writer.finish()?;
    buffered
        .into_inner()
        .map_err(|e| Error::from(e.into_error()))?;
    let random = SealedRandomAccess::open(spool.reopen()?, &key[..], binding)?;
    // The spool file is unlinked now; the open handle keeps it readable until dropped.
    drop(spool);
    Ok(random)
}

/// Fixed-length byte array columns must be 1 to `MAX_FIXED_LEN` bytes wide: parquet sizes a
/// batch's buffer as rows x width before reading a value.
fn check_fixed_widths(schema: &parquet::schema::types::SchemaDescriptor) -> Result<()> {
    for column in schema.columns() {
        let width = column.type_length();
        if column.physical_type() == parquet::basic::Type::FIXED_LEN_BYTE_ARRAY
            && !(1..=MAX_FIXED_LEN).contains(&width)
        {
            return Err(Error::bad(
                "unsupported_parquet",
                format!(
                    "column {} is a fixed-length byte array of {width} bytes; escrow reads 1 to {MAX_FIXED_LEN}",
                    column.path().string()
                ),
            ));
        }
    }
    Ok(())
}

fn parquet_error(e: parquet::errors::ParquetError) -> Error {
    let msg: String = e.to_string().chars().take(200).collect();
    Error::bad("malformed_parquet", format!("malformed Parquet: {msg}"))
}

/// The spooled upload as parquet's `ChunkReader`.
#[derive(Clone)]
struct SpooledBytes {
    source: Arc<crate::crypto::seal::SealedRandomAccess>,
    /// Where the footer (metadata and its 8-byte tail) starts: readers before it are for
    /// page headers.
    footer_start: u64,
    pages: PageHeaderCheck,
}

/// What every page header is checked against before parquet reads it.
#[derive(Clone, Default)]
struct PageHeaderCheck {
    /// The largest uncompressed size a page may declare (set once the footer is read:
    /// it depends on the number of columns; 0 until then).
    max_page: Arc<std::sync::atomic::AtomicU64>,
    /// A refusal with its own code, kept for the error the upload gets.
    refused: Refused,
}

impl PageHeaderCheck {
    /// Walk the page header at the start of `header` ([`walk_thrift_struct`]) and check
    /// the uncompressed size it declares (PageHeader field 2): parquet reserves that much
    /// and decompresses into it before any page check of ours can see the page.
    fn check(&self, header: impl Read) -> io::Result<()> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let fields =
            walk_thrift_struct(header).map_err(|e| invalid(format!("page header: {e}")))?;
        let size = fields.iter().find(|(id, _)| *id == 2).map(|(_, v)| *v);
        let max = self.max_page.load(std::sync::atomic::Ordering::Relaxed);
        match size {
            Some(n) if n < 0 => Err(invalid(format!(
                "page header: a page declares {n} bytes uncompressed"
            ))),
            Some(n) if n as u64 > max => {
                let e = Error::bad(
                    "unsupported_parquet",
                    format!(
                        "a page declares {n} bytes uncompressed; escrow reads pages of at most {max} bytes in a file of this many columns; write it with smaller pages (pyarrow: data_page_size)"
                    ),
                );
                Err(invalid(refuse(&self.refused, e)))
            }
            _ => Ok(()),
        }
    }
}

impl parquet::file::reader::Length for SpooledBytes {
    fn len(&self) -> u64 {
        self.source.len()
    }
}

impl SpooledBytes {
    /// The spool, once its footer walks within its own length ([`walk_thrift_struct`]).
    fn open(
        source: Arc<crate::crypto::seal::SealedRandomAccess>,
        pages: PageHeaderCheck,
    ) -> Result<SpooledBytes> {
        let len = source.len();
        let mut spool = SpooledBytes {
            source,
            footer_start: len.saturating_sub(8),
            pages,
        };
        let Some(tail_at) = len.checked_sub(8) else {
            return Ok(spool); // parquet refuses it
        };
        let tail = parquet::file::reader::ChunkReader::get_bytes(&spool, tail_at, 8)
            .map_err(parquet_error)?;
        let metadata_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        if &tail[4..] != b"PAR1" || metadata_len > tail_at {
            return Ok(spool); // not a plain footer: parquet refuses it
        }
        spool.footer_start = tail_at - metadata_len;
        walk_thrift_struct(SpooledRead::at(&spool.source, spool.footer_start).take(metadata_len))
            .map_err(|e| {
            Error::bad(
                "malformed_parquet",
                format!("malformed Parquet: footer: {e}"),
            )
        })?;
        Ok(spool)
    }
}

/// Walk one Thrift compact-protocol struct, charging at least one byte for every element of
/// a list, set or map, and skipping binary fields without allocating them. parquet's Thrift
/// reader skips unknown fields charging nothing for a boolean list element, so a header with
/// an unknown `list<bool>` field of 2^31 elements spun for seconds per 9 KB upload (found by
/// fuzz/ingest_parquet; nested lists multiply it), and it reserves a footer's declared
/// row-group count before reading them. A struct that walks within the bytes that follow it
/// bounds both by the upload's size. Apache Thrift's Rust reader was tried first: it
/// allocates a binary field's declared length (4 GB from five bytes, also found by the
/// fuzzer) and reads binary as UTF-8, so the walk reads the compact protocol's framing
/// itself (thrift-compact-protocol.md: field headers, varints, list and map headers).
///
/// Returns the struct's own integer fields (id, value), for checks of what they declare.
fn walk_thrift_struct(input: impl Read) -> io::Result<Vec<(i16, i64)>> {
    let mut ints = Vec::new();
    walk_thrift(
        &mut BufReader::new(input),
        THRIFT_STRUCT,
        64,
        Some(&mut ints),
    )?;
    Ok(ints)
}

const THRIFT_STRUCT: u8 = 12;

/// `ints`: where to put the integer fields of the struct walked (not of nested ones).
fn walk_thrift(
    r: &mut impl Read,
    ty: u8,
    depth: u8,
    mut ints: Option<&mut Vec<(i16, i64)>>,
) -> io::Result<()> {
    use integer_encoding::VarIntReader;
    let malformed = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let depth = depth
        .checked_sub(1)
        .ok_or_else(|| malformed("nested too deep"))?;
    let byte = |r: &mut dyn Read| -> io::Result<u8> {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        Ok(b[0])
    };
    let skip = |r: &mut dyn Read, n: u64| -> io::Result<()> {
        if io::copy(&mut r.take(n), &mut io::sink())? != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    };
    match ty {
        // a boolean, byte: one byte (a boolean field's value is in its header instead)
        1..=3 => {
            byte(r)?;
        }
        // i16, i32, i64: a zigzag varint
        4..=6 => {
            r.read_varint::<u64>()?;
        }
        7 => skip(r, 8)?,
        8 => {
            let n = r.read_varint::<u64>()?;
            skip(r, n)?;
        }
        // list, set: size (4 bits, or a varint after 15) and element type
        9 | 10 => {
            let header = byte(r)?;
            let size = match header >> 4 {
                15 => u64::from(r.read_varint::<u32>()?),
                n => u64::from(n),
            };
            for _ in 0..size {
                walk_thrift(r, header & 0x0f, depth, None)?;
            }
        }
        11 => {
            let size = r.read_varint::<u32>()?;
            if size > 0 {
                let types = byte(r)?;
                for _ in 0..size {
                    walk_thrift(r, types >> 4, depth, None)?;
                    walk_thrift(r, types & 0x0f, depth, None)?;
                }
            }
        }
        THRIFT_STRUCT => {
            let mut id: i16 = 0;
            loop {
                let header = byte(r)?;
                if header == 0 {
                    break; // stop
                }
                id = match header >> 4 {
                    0 => r.read_varint::<i16>()?, // a field id that is not a small delta
                    delta => id.wrapping_add(i16::from(delta)),
                };
                match (header & 0x0f, ints.as_deref_mut()) {
                    (1 | 2, _) => {} // boolean field
                    // byte, i16, i32, i64 of this struct: zigzag varints (a byte is raw)
                    (4..=6, Some(ints)) => ints.push((id, r.read_varint::<i64>()?)),
                    (field, _) => walk_thrift(r, field, depth, None)?,
                }
            }
        }
        13 => skip(r, 16)?, // uuid
        _ => return Err(malformed("unknown Thrift type")),
    }
    Ok(())
}

impl parquet::file::reader::ChunkReader for SpooledBytes {
    type T = SpooledRead;

    /// Parquet reads each page header, and the footer's tail, through this.
    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let mut read = SpooledRead::at(&self.source, start);
        if start < self.footer_start {
            read.check_header = Some(self.pages.clone());
        }
        Ok(read)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let out = self
            .source
            .read_range(start, length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        if out.len() != length {
            return Err(parquet::errors::ParquetError::EOF(
                "read past the end of the file".into(),
            ));
        }
        Ok(bytes::Bytes::from(out))
    }
}

/// The bytes from an offset to the end of a Parquet upload (parquet reads page headers
/// through it), decrypted one segment at a time as they are read: a page header costs one
/// segment, not the rest of the file (reading it all made every header read allocate and
/// decrypt the remainder of the upload, quadratic in its pages).
///
/// Reading at the end is an error instead of `Ok(0)`: parquet's Thrift reader skips unknown
/// fields with `io::copy` and ignores how much was copied, so a page header declaring a
/// list of 2^31 fields past the end of the data spun for a minute per upload (found by
/// fuzz/ingest_parquet). Its other readers use `read_exact`, for which both mean the same.
struct SpooledRead {
    source: Arc<crate::crypto::seal::SealedRandomAccess>,
    /// Offset of the first byte after `window`.
    next: u64,
    window: Cursor<Vec<u8>>,
    /// Check the page header that starts here before the first read
    /// ([`PageHeaderCheck::check`]); parquet asks for readers it never reads from, such as
    /// one at the end of a column chunk.
    check_header: Option<PageHeaderCheck>,
}

impl SpooledRead {
    fn at(source: &Arc<crate::crypto::seal::SealedRandomAccess>, start: u64) -> SpooledRead {
        SpooledRead {
            source: source.clone(),
            next: start,
            window: Cursor::new(Vec::new()),
            check_header: None,
        }
    }
}

impl Read for SpooledRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(pages) = self.check_header.take() {
            pages.check(SpooledRead::at(&self.source, self.next))?;
        }
        if self.window.position() as usize == self.window.get_ref().len() {
            if self.next >= self.source.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the data",
                ));
            }
            let segment = self.source.segment_size();
            let to_segment_end = segment - self.next % segment;
            let bytes = self.source.read_range(self.next, to_segment_end)?;
            self.next += bytes.len() as u64;
            self.window = Cursor::new(bytes);
        }
        self.window.read(buf)
    }
}

/// A page check's refusal, kept for the error the upload gets.
type Refused = Arc<Mutex<Option<Error>>>;

/// Keep `e` as the upload's error and return its message, for the error parquet passes on.
fn refuse(refused: &Refused, e: Error) -> String {
    let message = e.to_string();
    *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    message
}

/// The upload's row groups as the Arrow reader reads them, with every page checked first
/// ([`CheckedPages`]).
struct CheckedRowGroups {
    file: Arc<dyn FileReader>,
    refused: Refused,
}

impl RowGroups for CheckedRowGroups {
    fn num_rows(&self) -> usize {
        RowGroups::num_rows(&self.file)
    }

    fn column_chunks(&self, i: usize) -> parquet::errors::Result<Box<dyn PageIterator>> {
        let column = self
            .file
            .metadata()
            .file_metadata()
            .schema_descr()
            .column(i);
        Ok(Box::new(CheckedChunks {
            file: self.file.clone(),
            column: i,
            min_bits: min_value_bits(&column),
            name: column.path().string(),
            row_groups: 0..self.file.num_row_groups(),
            refused: self.refused.clone(),
        }))
    }

    fn row_groups(&self) -> Box<dyn Iterator<Item = &RowGroupMetaData> + '_> {
        RowGroups::row_groups(&self.file)
    }

    fn metadata(&self) -> &parquet::file::metadata::ParquetMetaData {
        self.file.metadata()
    }
}

/// The fewest bits one plain-encoded value of a column can take.
fn min_value_bits(column: &parquet::schema::types::ColumnDescriptor) -> u64 {
    use parquet::basic::Type;
    match column.physical_type() {
        Type::BOOLEAN => 1,
        Type::INT32 | Type::FLOAT | Type::BYTE_ARRAY => 32, // byte arrays: a 4-byte length
        Type::INT64 | Type::DOUBLE => 64,
        Type::INT96 => 96,
        Type::FIXED_LEN_BYTE_ARRAY => 8 * u64::try_from(column.type_length()).unwrap_or(1),
    }
}

/// One column's chunks, row group after row group.
struct CheckedChunks {
    file: Arc<dyn FileReader>,
    column: usize,
    min_bits: u64,
    name: String,
    row_groups: std::ops::Range<usize>,
    refused: Refused,
}

impl Iterator for CheckedChunks {
    type Item = parquet::errors::Result<Box<dyn PageReader>>;

    fn next(&mut self) -> Option<Self::Item> {
        let rg = self.row_groups.next()?;
        Some(
            self.file
                .get_row_group(rg)
                .and_then(|r| r.get_column_page_reader(self.column))
                .map(|pages| {
                    Box::new(CheckedPages {
                        pages,
                        min_bits: self.min_bits,
                        name: self.name.clone(),
                        refused: self.refused.clone(),
                    }) as Box<dyn PageReader>
                }),
        )
    }
}

impl PageIterator for CheckedChunks {}

/// A column chunk's pages, each checked before the Arrow reader decodes it, against what
/// parquet's decoders would otherwise allocate on a page's word (found by
/// fuzz/ingest_parquet, which made a dictionary page of a few KB ask for 8 GB):
/// - a dictionary page may not declare more values than its bytes can hold: decoders size
///   the dictionary by the declared count before reading it;
/// - data pages in `DELTA_LENGTH_BYTE_ARRAY` or `DELTA_BYTE_ARRAY` are refused
///   (`unsupported_parquet`): their
///   decoders allocate the value count in the encoded data before checking it against the
///   page, and that count is a 64-bit varint (writers use these encodings only when asked;
///   the defaults are dictionary and plain).
struct CheckedPages {
    pages: Box<dyn PageReader>,
    min_bits: u64,
    name: String,
    refused: Refused,
}

impl CheckedPages {
    fn check(&self, page: &parquet::column::page::Page) -> std::result::Result<(), Error> {
        use parquet::basic::Encoding;
        use parquet::column::page::Page;
        match page {
            Page::DictionaryPage {
                buf, num_values, ..
            } => {
                let room = 8 * buf.len() as u64;
                if u64::from(*num_values).saturating_mul(self.min_bits) > room {
                    return Err(Error::bad(
                        "malformed_parquet",
                        format!(
                            "malformed Parquet: a dictionary page of column {} declares {num_values} values in {} bytes",
                            self.name,
                            buf.len()
                        ),
                    ));
                }
            }
            Page::DataPage { encoding, .. } | Page::DataPageV2 { encoding, .. }
                if matches!(
                    encoding,
                    Encoding::DELTA_LENGTH_BYTE_ARRAY | Encoding::DELTA_BYTE_ARRAY
                ) =>
            {
                return Err(Error::bad(
                    "unsupported_parquet",
                    format!(
                        "column {} is encoded as {encoding}, which escrow does not read (its decoder trusts a declared count); write it with dictionary or plain encoding",
                        self.name
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

impl PageReader for CheckedPages {
    fn get_next_page(&mut self) -> parquet::errors::Result<Option<parquet::column::page::Page>> {
        let Some(page) = self.pages.get_next_page()? else {
            return Ok(None);
        };
        match self.check(&page) {
            Ok(()) => Ok(Some(page)),
            Err(e) => Err(parquet::errors::ParquetError::General(refuse(
                &self.refused,
                e,
            ))),
        }
    }

    fn peek_next_page(
        &mut self,
    ) -> parquet::errors::Result<Option<parquet::column::page::PageMetadata>> {
        self.pages.peek_next_page()
    }

    fn skip_next_page(&mut self) -> parquet::errors::Result<()> {
        self.pages.skip_next_page()
    }

    fn at_record_boundary(&mut self) -> parquet::errors::Result<bool> {
        self.pages.at_record_boundary()
    }
}

impl Iterator for CheckedPages {
    type Item = parquet::errors::Result<parquet::column::page::Page>;

    fn next(&mut self) -> Option<Self::Item> {
        self.get_next_page().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Schema};

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("site", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n)),
                Arc::new(StringArray::from_iter(
                    (0..n).map(|i| (i % 3 != 0).then(|| format!("s{i}.example"))),
                )),
            ],
        )
        .expect("batch")
    }

    fn arrow_file(batches: &[RecordBatch]) -> Vec<u8> {
        let mut w =
            arrow_ipc::writer::FileWriter::try_new(Vec::new(), &batches[0].schema()).expect("w");
        for b in batches {
            w.write(b).expect("write");
        }
        w.finish().expect("finish");
        w.into_inner().expect("inner")
    }

    fn run(format: Option<Format>, bytes: &[u8], key: Option<&str>) -> Result<Ingested> {
        let key = KeySpec {
            column: key.map(str::to_string),
            ..KeySpec::default()
        };
        ingest(format, bytes, &key, Vec::new(), &IngestLimits::default()).map(|(i, _)| i)
    }

    fn parquet(batch: &RecordBatch, props: parquet::file::properties::WriterProperties) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
            .expect("writer");
        w.write(batch).expect("write");
        w.close().expect("close");
        out
    }

    fn run_parquet(bytes: &[u8]) -> Result<Ingested> {
        run_parquet_with(bytes, IngestLimits::default())
    }

    fn run_parquet_with(bytes: &[u8], limits: IngestLimits) -> Result<Ingested> {
        let spool = tempfile::tempdir().expect("spool");
        let limits = IngestLimits {
            spool_dir: Some(spool.path().to_path_buf()),
            batch_rows: 1000,
            ..limits
        };
        ingest(
            Some(Format::Parquet),
            bytes,
            &KeySpec::default(),
            Vec::new(),
            &limits,
        )
        .map(|(i, _)| i)
    }

    /// An input of tests/corpus/fuzz/ingest_parquet, without the fuzz target's selector byte.
    fn fuzz_input(name: &str) -> Vec<u8> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/corpus/fuzz/ingest_parquet"
        );
        let mut input = std::fs::read(format!("{dir}/{name}")).expect("corpus file");
        input.remove(0);
        input
    }

    #[test]
    fn parquet_pages_declaring_more_than_the_page_limit_are_refused_before_decompression() {
        use parquet::basic::{Compression, ZstdLevel};
        use parquet::file::properties::WriterProperties;
        // a decompression bomb in miniature: 200,000 equal values in one zstd page, a few
        // KB on the wire and 4.6 MB once decompressed
        let schema = Arc::new(Schema::new(vec![Field::new("site", DataType::Utf8, false)]));
        let same = StringArray::from_iter_values((0..200_000).map(|_| "same.example.com"));
        let b = RecordBatch::try_new(schema, vec![Arc::new(same)]).expect("batch");
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_dictionary_enabled(false)
            .set_data_page_size_limit(usize::MAX)
            .set_data_page_row_count_limit(usize::MAX)
            .build();
        let bytes = parquet(&b, props);
        assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());

        let got = run_parquet(&bytes).expect("within the default limits");
        assert_eq!(got.rows, 200_000);
        for limits in [
            IngestLimits {
                max_parquet_page: 1 << 20,
                ..IngestLimits::default()
            },
            // the budget over one column
            IngestLimits {
                parquet_page_budget: 1 << 20,
                ..IngestLimits::default()
            },
        ] {
            let e = run_parquet_with(&bytes, limits).expect_err("refused");
            assert_eq!(e.code(), "unsupported_parquet", "{e}");
            assert!(e.to_string().contains("at most 1048576 bytes"), "{e}");
        }
    }

    #[test]
    fn parquet_with_many_pages_and_row_groups_is_read_whole() {
        use parquet::file::properties::WriterProperties;
        let b = batch(10_000);
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(3_000))
            .set_data_page_row_count_limit(100)
            .set_write_batch_size(100)
            .build();
        let bytes = parquet(&b, props);
        let got = run_parquet(&bytes).expect("many pages");
        assert_eq!(got.rows, 10_000);
        assert_eq!(got.columns.len(), 2);
    }

    #[test]
    fn parquet_dictionary_page_declaring_more_values_than_it_holds_is_refused() {
        // fuzz/ingest_parquet found a 9 KB upload whose dictionary page declared about two
        // billion values, for which the decoder reserved 8 GB (that input, kept in
        // tests/corpus/fuzz, is now refused earlier, by the header walk). Here a valid file's
        // first dictionary page (column id: 3 values, 24 bytes) is made to declare 63.
        let props = parquet::file::properties::WriterProperties::builder().build();
        let mut bytes = parquet(&batch(3), props);
        // DictionaryPageHeader (PageHeader field 7) { num_values: 3 } as Thrift compact
        let at = bytes
            .windows(3)
            .position(|w| w == [0x4c, 0x15, 0x06])
            .expect("dictionary page header");
        bytes[at + 2] = 0x7e; // zigzag 63
        let e = run_parquet(&bytes).expect_err("refused");
        assert_eq!(e.code(), "malformed_parquet", "{e}");
        assert!(
            e.to_string()
                .contains("a dictionary page of column id declares 63 values in 24 bytes"),
            "{e}"
        );
    }

    #[test]
    fn parquet_page_header_with_a_huge_unknown_list_of_booleans_is_refused_at_once() {
        // found by fuzz/ingest_parquet: parquet skipped 2^31 list elements reading no byte
        let input = fuzz_input("page-header-unknown-list-of-bools");
        let started = std::time::Instant::now();
        let e = run_parquet(&input).expect_err("refused");
        assert_eq!(e.code(), "malformed_parquet", "{e}");
        assert!(e.to_string().contains("page header"), "{e}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn parquet_footer_declaring_a_4_gb_binary_field_is_refused_without_allocating_it() {
        // found by fuzz/ingest_parquet when the walk used Apache Thrift's reader, which
        // allocated the declared length first
        let e = run_parquet(&fuzz_input("footer-binary-declares-4-gb")).expect_err("refused");
        assert_eq!(e.code(), "malformed_parquet", "{e}");
        assert!(e.to_string().contains("footer"), "{e}");
    }

    #[test]
    fn parquet_delta_byte_array_pages_are_refused_by_name() {
        use parquet::basic::Encoding;
        use parquet::file::properties::WriterProperties;
        for encoding in [
            Encoding::DELTA_LENGTH_BYTE_ARRAY,
            Encoding::DELTA_BYTE_ARRAY,
        ] {
            let props = WriterProperties::builder()
                .set_column_dictionary_enabled("site".into(), false)
                .set_column_encoding("site".into(), encoding)
                .build();
            let e = run_parquet(&parquet(&batch(50), props)).expect_err("delta refused");
            assert_eq!(e.code(), "unsupported_parquet", "{encoding}: {e}");
            assert!(e.to_string().contains("column site"), "{e}");
        }
        // the same list with its defaults (dictionary) is read
        let props = WriterProperties::builder().build();
        assert_eq!(
            run_parquet(&parquet(&batch(50), props))
                .expect("plain")
                .rows,
            50
        );
    }

    #[test]
    fn parquet_fixed_length_columns_wider_than_4_kib_are_refused() {
        use arrow_array::FixedSizeBinaryArray;
        let rows = |width: usize| {
            let schema = Arc::new(Schema::new(vec![Field::new(
                "blob",
                DataType::FixedSizeBinary(width as i32),
                false,
            )]));
            let values = (0..3u8).map(|i| vec![i; width]);
            let array = FixedSizeBinaryArray::try_from_iter(values).expect("array");
            RecordBatch::try_new(schema, vec![Arc::new(array)]).expect("batch")
        };
        let props = || parquet::file::properties::WriterProperties::builder().build();
        let e = run_parquet(&parquet(&rows(8192), props())).expect_err("too wide");
        assert_eq!(e.code(), "unsupported_parquet", "{e}");
        assert!(e.to_string().contains("column blob"), "{e}");
        assert_eq!(
            run_parquet(&parquet(&rows(16), props()))
                .expect("uuid")
                .rows,
            3
        );
    }

    #[test]
    fn csv_exports_with_bom_and_other_delimiters() {
        for (text, delim) in [
            (
                "\u{feff}id;site;n\n1;a.example;3\n2;b.example;4\n",
                "semicolon+BOM",
            ),
            ("id\tsite\tn\n1\ta.example\t3\n", "tab"),
            (
                "\"id\",\"site; or not\",n\n1,\"a.example\",3\n",
                "quoted comma",
            ),
        ] {
            let got = run(
                None,
                text.as_bytes(),
                Some("site").filter(|_| !delim.starts_with("quoted")),
            )
            .unwrap_or_else(|e| panic!("{delim}: {e}"));
            assert_eq!(got.format, Format::Csv, "{delim}");
            assert_eq!(got.columns[0].name, "id", "{delim}");
            assert_eq!(got.columns.len(), 3, "{delim}");
            assert_eq!(got.columns[2].data_type, "Int64", "{delim}");
        }
    }

    #[test]
    fn arrow_file_round_trip() {
        let f = arrow_file(&[batch(100), batch(50)]);
        let got = run(None, &f, Some("site")).expect("ingest");
        assert_eq!(got.format, Format::ArrowFile);
        assert_eq!(got.rows, 150);
    }
}
