//! Ingest: turn an uploaded byte stream (CSV, Arrow IPC file or stream, Parquet) into
//! validated Arrow record batches and write them, as one Arrow IPC stream, into a sink
//! (the sealing writer). Streaming: memory is bounded by one batch / one IPC message,
//! never by the upload size. No HTTP here; the server feeds it a blocking reader.
//!
//! Parsing is done by the arrow and parquet crates; this module adds only the bounds a
//! hostile upload needs (message size caps checked *before* allocating) and the
//! schema checks escrow relies on (named, unique columns; an existing key column).

mod csv;
mod ipc;
mod parquet;

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, RecordBatch};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, SchemaRef};

use crate::catalog::ColumnInfo;
use crate::matching::{
    COMPANY_KEY, ID_CHECK, KEY_ID, MatchStats, NAME_ID, NAME_KEY, Names, PLACE_ID, PLACE_KEY,
    PLACE_KINDS, company_keys_parallel, detect_places, is_text, place_keys, place_kind,
    place_kinds,
};
use crate::{Error, Result};
pub use csv::DeclaredSchema;
use csv::{csv_batches, schema_even_if_empty};
use ipc::{IpcBatches, read_up_to, strip};
use parquet::parquet_batches;

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

/// How an upload is read: which column identifies a company, and how; and the types its
/// uploader declared for a CSV's columns.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub column: Option<String>,
    /// Company names for rows without a usable website (website keys only).
    pub name_column: Option<String>,
    /// Columns whose values must agree as well when companies are matched by name (a
    /// country, a region): part of each row's name key.
    pub name_context: Vec<String>,
    /// Columns giving each row's place, compared when a name links two companies
    /// (`matching::PLACE_KEY`).
    pub places: Places,
    pub key_type: KeyType,
    /// Column types over the ones inferred from a CSV's first rows (`upload --schema`).
    pub declared: DeclaredSchema,
    /// With a key column: the entity ids of each row's key, name and place, computed now
    /// and sealed (`matching::KEY_ID`).
    pub ids: Option<crate::matching::StoredIds>,
}

/// Which columns give a row's place (`matching::PLACE_KEY`), with a name column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Places {
    /// The upload's country, region and state columns, recognised by their headers
    /// (`matching::place_kind`); none when name-context columns are given (they already
    /// qualify every name).
    #[default]
    Detect,
    /// No place: names link on the name alone (`--places none`).
    None,
    /// These columns (`--places COL,...`).
    Columns(Vec<String>),
}

impl Places {
    /// `--places`: absent or empty to detect, `none`, or comma-separated columns.
    pub fn parse(s: Option<&str>) -> Self {
        let columns: Vec<String> = s
            .into_iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        match columns.as_slice() {
            [] => Places::Detect,
            [none] if none == "none" => Places::None,
            _ => Places::Columns(columns),
        }
    }
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
    /// The place columns in effect (`matching::PLACE_KEY`).
    pub places: Vec<String>,
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
    if format != Format::Csv && !key.declared.is_empty() {
        return Err(Error::bad(
            "bad_schema",
            "--schema is for CSV uploads: Parquet and Arrow files carry their column types",
        ));
    }
    let mut batches: Box<dyn Iterator<Item = Result<RecordBatch>> + 'a> = match format {
        Format::Csv => csv_batches(input, limits, &key.declared)?,
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
    if matches!(key.places, Places::Columns(_)) && key.name_column.is_none() {
        return Err(Error::bad(
            "invalid_places",
            "place columns qualify a name column: give --name-column too",
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
            let places = match (&key.places, key.name_column.as_deref()) {
                (Places::Detect, Some(n)) if key.name_context.is_empty() => {
                    detect_places(&schema, &[k, n])
                }
                (Places::Columns(columns), Some(n)) => {
                    let mut kinds = HashSet::new();
                    for c in columns {
                        place_column(&schema, c, k, n)?;
                        let kind = place_kind(c);
                        if kinds.contains(&kind) {
                            return Err(Error::bad(
                                "invalid_places",
                                format!(
                                    "{c:?} is a second place column of its kind ({kind}); give one per kind, so both lists compare like with like"
                                ),
                            ));
                        }
                        kinds.insert(kind);
                    }
                    columns.clone()
                }
                _ => Vec::new(),
            };
            let place_indices = places
                .iter()
                .map(|c| schema.index_of(c).map_err(internal_arrow))
                .collect::<Result<Vec<_>>>()?;
            Some((
                schema.index_of(k).map_err(internal_arrow)?,
                name,
                context,
                (places, place_indices),
            ))
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
        Some((_, name, _, (places, _))) => {
            let mut fields: Vec<arrow_schema::FieldRef> = schema.fields().iter().cloned().collect();
            let hidden = [Some(COMPANY_KEY), name.map(|_| NAME_KEY)];
            for column in hidden.into_iter().flatten() {
                fields.push(Arc::new(arrow_schema::Field::new(
                    column,
                    DataType::Utf8,
                    true,
                )));
            }
            if !places.is_empty() {
                fields.push(Arc::new(
                    arrow_schema::Field::new(PLACE_KEY, DataType::Utf8, true)
                        .with_metadata([(PLACE_KINDS.to_string(), place_kinds(places))].into()),
                ));
            }
            Arc::new(arrow_schema::Schema::new_with_metadata(
                fields,
                schema.metadata().clone(),
            ))
        }
        None => schema.clone(),
    };
    // Ids computed at upload: of the company key (or the key text), the name key, the place.
    let ids = match (&key.ids, key_column) {
        (Some(ids), Some(k)) => {
            let key_source = sealed_schema
                .index_of(COMPANY_KEY)
                .or_else(|_| sealed_schema.index_of(k))
                .map_err(internal_arrow)?;
            let mut sources = vec![(KEY_ID, key_source)];
            for (id, text) in [(NAME_ID, NAME_KEY), (PLACE_ID, PLACE_KEY)] {
                if let Ok(i) = sealed_schema.index_of(text) {
                    sources.push((id, i));
                }
            }
            let check = [(ID_CHECK.to_string(), ids.check.to_string())];
            let mut fields: Vec<arrow_schema::FieldRef> =
                sealed_schema.fields().iter().cloned().collect();
            fields.extend(sources.iter().map(|(id, _)| {
                Arc::new(
                    arrow_schema::Field::new(*id, DataType::UInt64, true)
                        .with_metadata(check.clone().into()),
                )
            }));
            let with_ids = Arc::new(arrow_schema::Schema::new_with_metadata(
                fields,
                sealed_schema.metadata().clone(),
            ));
            Some((ids.hash.clone(), sources, with_ids))
        }
        _ => None,
    };
    let text_schema = sealed_schema;
    let sealed_schema = ids
        .as_ref()
        .map_or(text_schema.clone(), |(_, _, with_ids)| with_ids.clone());
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
            Some((k, name, context, (places, place_indices))) => {
                let context: Vec<&dyn Array> =
                    context.iter().map(|&c| batch.column(c).as_ref()).collect();
                let names = name.map(|n| Names {
                    name: batch.column(n).as_ref(),
                    context: &context,
                });
                let (keys, name_keys) =
                    company_keys_parallel(batch.column(*k).as_ref(), names, &mut stats)
                        .map_err(internal_arrow)?;
                let mut cols = batch.columns().to_vec();
                cols.push(keys);
                cols.extend(name_keys);
                if !places.is_empty() {
                    let columns: Vec<(&str, &dyn Array)> = places
                        .iter()
                        .zip(place_indices)
                        .map(|(c, &i)| (c.as_str(), batch.column(i).as_ref()))
                        .collect();
                    cols.push(place_keys(&columns).map_err(internal_arrow)?);
                }
                RecordBatch::try_new(text_schema.clone(), cols).map_err(internal_arrow)?
            }
            None => batch,
        };
        let batch = match &ids {
            Some((hash, sources, _)) => {
                let mut cols = batch.columns().to_vec();
                for (_, source) in sources {
                    cols.push(hash(batch.column(*source).as_ref())?);
                }
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
            places: company
                .as_ref()
                .map(|(_, _, _, (places, _))| places.clone())
                .unwrap_or_default(),
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

/// The index of a column qualifying the name column (a name context, a place): any column of
/// the upload but the key and name. `what` names it in messages (`name context`, `place`),
/// `label` before the word column (`name-context`, `place`).
fn qualifying_column(
    schema: &SchemaRef,
    name: &str,
    [key, name_column]: [Option<&str>; 2],
    (code, what, label): (&'static str, &str, &str),
) -> Result<usize> {
    if Some(name) == key || Some(name) == name_column {
        return Err(Error::bad(
            code,
            format!("{name:?} is the key or name column; a {what} is another column"),
        ));
    }
    schema.index_of(name).map_err(|_| {
        Error::bad(
            code,
            format!("{label} column {name:?} is not a column of the upload"),
        )
    })
}

/// The index of a name-context column.
fn context_column(
    schema: &SchemaRef,
    name: &str,
    key: Option<&str>,
    name_column: Option<&str>,
) -> Result<usize> {
    qualifying_column(
        schema,
        name,
        [key, name_column],
        ("invalid_name_context", "name context", "name-context"),
    )
}

/// A place column given with `--places`: a text column other than the key and name.
fn place_column(schema: &SchemaRef, name: &str, key: &str, name_column: &str) -> Result<usize> {
    let i = qualifying_column(
        schema,
        name,
        [Some(key), Some(name_column)],
        ("invalid_places", "place", "place"),
    )?;
    if !is_text(schema.field(i).data_type()) {
        return Err(Error::bad(
            "invalid_places",
            format!("place column {name:?} must be text (a country, region or state name or code)"),
        ));
    }
    Ok(i)
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

#[cfg(test)]
mod tests;
