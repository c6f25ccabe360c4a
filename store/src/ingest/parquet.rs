//! Parquet: spooled to sealed temporary segments (the footer comes last), then read
//! with every page header, chunk and row group checked against limits before decoding.

use super::*;
use ::parquet::arrow::arrow_reader::RowGroups;
use ::parquet::column::page::{PageIterator, PageReader};
use ::parquet::file::metadata::RowGroupMetaData;
use ::parquet::file::reader::FileReader;

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
pub(super) fn parquet_batches<'a, R: Read + 'a>(
    input: BufReader<R>,
    limits: &IngestLimits,
) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + 'a>> {
    use ::parquet::arrow::arrow_reader::ParquetRecordBatchReader;
    use ::parquet::file::reader::{FileReader, SerializedFileReader};

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
        ::parquet::arrow::parquet_to_arrow_schema(meta.schema_descr(), meta.key_value_metadata())
            .map_err(parquet_error)?;
    let levels = ::parquet::arrow::parquet_to_arrow_field_levels(
        meta.schema_descr(),
        ::parquet::arrow::ProjectionMask::all(),
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
fn check_fixed_widths(schema: &::parquet::schema::types::SchemaDescriptor) -> Result<()> {
    for column in schema.columns() {
        let width = column.type_length();
        if column.physical_type() == ::parquet::basic::Type::FIXED_LEN_BYTE_ARRAY
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

fn parquet_error(e: ::parquet::errors::ParquetError) -> Error {
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

impl ::parquet::file::reader::Length for SpooledBytes {
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
        let tail = ::parquet::file::reader::ChunkReader::get_bytes(&spool, tail_at, 8)
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

impl ::parquet::file::reader::ChunkReader for SpooledBytes {
    type T = SpooledRead;

    /// Parquet reads each page header, and the footer's tail, through this.
    fn get_read(&self, start: u64) -> ::parquet::errors::Result<Self::T> {
        let mut read = SpooledRead::at(&self.source, start);
        if start < self.footer_start {
            read.check_header = Some(self.pages.clone());
        }
        Ok(read)
    }

    fn get_bytes(&self, start: u64, length: usize) -> ::parquet::errors::Result<bytes::Bytes> {
        let out = self
            .source
            .read_range(start, length as u64)
            .map_err(|e| ::parquet::errors::ParquetError::External(Box::new(e)))?;
        if out.len() != length {
            return Err(::parquet::errors::ParquetError::EOF(
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

    fn column_chunks(&self, i: usize) -> ::parquet::errors::Result<Box<dyn PageIterator>> {
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

    fn metadata(&self) -> &::parquet::file::metadata::ParquetMetaData {
        self.file.metadata()
    }
}

/// The fewest bits one plain-encoded value of a column can take.
fn min_value_bits(column: &::parquet::schema::types::ColumnDescriptor) -> u64 {
    use ::parquet::basic::Type;
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
    type Item = ::parquet::errors::Result<Box<dyn PageReader>>;

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
    fn check(&self, page: &::parquet::column::page::Page) -> std::result::Result<(), Error> {
        use ::parquet::basic::Encoding;
        use ::parquet::column::page::Page;
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
    fn get_next_page(
        &mut self,
    ) -> ::parquet::errors::Result<Option<::parquet::column::page::Page>> {
        let Some(page) = self.pages.get_next_page()? else {
            return Ok(None);
        };
        match self.check(&page) {
            Ok(()) => Ok(Some(page)),
            Err(e) => Err(::parquet::errors::ParquetError::General(refuse(
                &self.refused,
                e,
            ))),
        }
    }

    fn peek_next_page(
        &mut self,
    ) -> ::parquet::errors::Result<Option<::parquet::column::page::PageMetadata>> {
        self.pages.peek_next_page()
    }

    fn skip_next_page(&mut self) -> ::parquet::errors::Result<()> {
        self.pages.skip_next_page()
    }

    fn at_record_boundary(&mut self) -> ::parquet::errors::Result<bool> {
        self.pages.at_record_boundary()
    }
}

impl Iterator for CheckedPages {
    type Item = ::parquet::errors::Result<::parquet::column::page::Page>;

    fn next(&mut self) -> Option<Self::Item> {
        self.get_next_page().transpose()
    }
}
