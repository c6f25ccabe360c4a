//! Reading some columns of a sealed version: only the segments that hold them are decrypted.
//!
//! A version's plaintext is an Arrow IPC stream. Each record batch's message lists where
//! every buffer of every column lies in its body, and a column's buffers lie together. So a
//! reader that wants three columns of twenty reads each message's metadata, then decrypts
//! just the byte ranges of those columns' buffers (`SealedRandomAccess`: fixed-size
//! segments, each authenticated with its index and last flag) and skips the rest. The
//! stream's end-of-stream marker is always read: it lies in the last segment, which is
//! sealed as the last, so a cut file still fails; a file longer than its stream fails too.
//!
//! Skipped segments are never authenticated, and never used: whatever they hold does not
//! reach an answer. A batch whose layout this module does not know (a type it cannot walk,
//! or a buffer count that disagrees with its own walk) is read whole, as before.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_buffer::Buffer;
use arrow_ipc::{MessageHeader, MetadataVersion, convert, reader};
use arrow_schema::{ArrowError, DataType, Field, SchemaRef, UnionMode};

use crate::crypto::seal::SealedRandomAccess;
use crate::{Error, Result};

/// Largest message metadata accepted (a schema of thousands of columns fits well within).
const MAX_METADATA: u64 = 64 << 20;

/// The record batches of a sealed version, with only the columns `projection` names (stored
/// column indices, ascending).
pub struct ProjectedBatches {
    source: SealedRandomAccess,
    pos: u64,
    schema: SchemaRef,
    projection: Vec<usize>,
    /// `schema` projected: the batches' schema.
    projected: SchemaRef,
    dictionaries: HashMap<i64, ArrayRef>,
    done: bool,
}

impl ProjectedBatches {
    /// Start reading; reads the stream's schema message.
    pub fn new(source: SealedRandomAccess, projection: Vec<usize>) -> Result<Self> {
        let mut this = ProjectedBatches {
            source,
            pos: 0,
            schema: Arc::new(arrow_schema::Schema::empty()),
            projection,
            projected: Arc::new(arrow_schema::Schema::empty()),
            dictionaries: HashMap::new(),
            done: false,
        };
        let (meta, body) = this
            .message()?
            .ok_or_else(|| integrity("the sealed stream has no schema"))?;
        let message = parse(&meta)?;
        let schema = message
            .header_as_schema()
            .ok_or_else(|| integrity("the sealed stream does not start with a schema"))?;
        this.schema = Arc::new(convert::fb_to_schema(schema));
        if this
            .projection
            .iter()
            .any(|&i| i >= this.schema.fields().len())
        {
            return Err(Error::internal("projection past the version's columns"));
        }
        this.projected = Arc::new(
            this.schema
                .project(&this.projection)
                .map_err(|e| Error::internal(format!("projecting a version: {e}")))?,
        );
        this.pos += body;
        Ok(this)
    }

    /// The version's whole schema (the stored columns).
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The next message's metadata and body length; the position moves to its body. `None`
    /// at the end-of-stream marker.
    fn message(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        let mut word = [0u8; 4];
        self.read(self.pos, &mut word)?;
        self.pos += 4;
        let mut len = i32::from_le_bytes(word);
        if len == -1 {
            // the continuation marker, then the length
            self.read(self.pos, &mut word)?;
            self.pos += 4;
            len = i32::from_le_bytes(word);
        }
        if len == 0 {
            return Ok(None);
        }
        let len = u64::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_METADATA)
            .ok_or_else(|| integrity("a message of the sealed stream has a bad length"))?;
        let mut meta = vec![0u8; len as usize];
        self.read(self.pos, &mut meta)?;
        self.pos += len;
        let body = u64::try_from(parse(&meta)?.bodyLength())
            .ok()
            .filter(|b| {
                self.pos
                    .checked_add(*b)
                    .is_some_and(|e| e <= self.source.len())
            })
            .ok_or_else(|| integrity("a message body runs past the sealed stream"))?;
        Ok(Some((meta, body)))
    }

    fn read(&self, at: u64, out: &mut [u8]) -> Result<()> {
        self.source.read_into(at, out).map_err(io_to_integrity)
    }

    /// The next record batch (dictionaries are taken in on the way).
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            let Some((meta, body_len)) = self.message()? else {
                if self.pos != self.source.len() {
                    return Err(integrity("data after the end of the stream"));
                }
                return Ok(None);
            };
            let message = parse(&meta)?;
            let version = message.version();
            let start = self.pos;
            self.pos += body_len;
            match message.header_type() {
                MessageHeader::DictionaryBatch => {
                    let dict = message
                        .header_as_dictionary_batch()
                        .ok_or_else(|| integrity("a dictionary message without its header"))?;
                    let body = self.body(start, body_len)?;
                    reader::read_dictionary(
                        &body,
                        dict,
                        &self.schema,
                        &mut self.dictionaries,
                        &version,
                    )
                    .map_err(arrow_to_integrity)?;
                }
                MessageHeader::RecordBatch => {
                    let batch = message
                        .header_as_record_batch()
                        .ok_or_else(|| integrity("a record batch message without its header"))?;
                    let layout = (batch.compression().is_none())
                        .then(|| column_layout(&self.schema, &batch, version))
                        .flatten();
                    return Ok(Some(match layout {
                        Some(layout) => self.columns(start, body_len, &batch, &layout, version)?,
                        None => {
                            let body = self.body(start, body_len)?;
                            reader::read_record_batch(
                                &body,
                                batch,
                                self.schema.clone(),
                                &self.dictionaries,
                                Some(&self.projection),
                                &version,
                            )
                            .map_err(arrow_to_integrity)?
                        }
                    }));
                }
                _ => return Err(integrity("an unexpected message in the sealed stream")),
            }
        }
    }

    /// A whole message body.
    fn body(&self, start: u64, len: u64) -> Result<Buffer> {
        let mut body = vec![0u8; len as usize];
        self.read(start, &mut body)?;
        Ok(Buffer::from_vec(body))
    }

    /// The projected columns of the record batch `batch` (its body at `start`, `len` bytes
    /// long), each decrypted straight into a buffer of its own: only its bytes are read, and
    /// the arrays decoded from it own exactly that allocation (what the cache keeps of a
    /// column is that column). Each column is decoded by arrow's reader from a copy of the
    /// batch's message whose buffers are addressed in the column's own buffer.
    fn columns(
        &self,
        start: u64,
        len: u64,
        batch: &arrow_ipc::RecordBatch<'_>,
        layout: &[Column],
        version: MetadataVersion,
    ) -> Result<RecordBatch> {
        let buffers = batch
            .buffers()
            .ok_or_else(|| integrity("a record batch without buffers"))?;
        let nodes: Vec<arrow_ipc::FieldNode> =
            batch.nodes().into_iter().flatten().copied().collect();
        let variadic: Vec<i64> = batch.variadicBufferCounts().into_iter().flatten().collect();
        let mut columns = Vec::with_capacity(self.projection.len());
        for &c in &self.projection {
            let column = &layout[c];
            let (from, to) = column.bytes;
            if to > len {
                return Err(integrity("a column runs past its message body"));
            }
            let mut own = vec![0u8; (to - from) as usize];
            if from < to {
                self.read(start + from, &mut own)?;
            }
            // Its buffers addressed in `own`, every other column's left empty (a projected
            // read skips them without looking).
            let moved: Vec<arrow_ipc::Buffer> = (0..buffers.len())
                .map(|i| {
                    let b = buffers.get(i);
                    match column.buffers.contains(&i) && b.length() > 0 {
                        true => arrow_ipc::Buffer::new(b.offset() - from as i64, b.length()),
                        false => arrow_ipc::Buffer::new(0, 0),
                    }
                })
                .collect();
            let mut fbb = flatbuffers::FlatBufferBuilder::new();
            let args = arrow_ipc::RecordBatchArgs {
                length: batch.length(),
                nodes: Some(fbb.create_vector(&nodes)),
                buffers: Some(fbb.create_vector(&moved)),
                compression: None,
                variadicBufferCounts: Some(fbb.create_vector(&variadic)),
            };
            let moved = arrow_ipc::RecordBatch::create(&mut fbb, &args);
            fbb.finish(moved, None);
            let moved = flatbuffers::root::<arrow_ipc::RecordBatch>(fbb.finished_data())
                .map_err(|e| Error::internal(format!("a record batch readdressed: {e}")))?;
            let decoded = reader::read_record_batch(
                &Buffer::from_vec(own),
                moved,
                self.schema.clone(),
                &self.dictionaries,
                Some(&[c]),
                &version,
            )
            .map_err(arrow_to_integrity)?;
            columns.push(decoded.column(0).clone());
        }
        RecordBatch::try_new_with_options(
            self.projected.clone(),
            columns,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.length() as usize)),
        )
        .map_err(arrow_to_integrity)
    }
}

impl Iterator for ProjectedBatches {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_batch();
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}

fn parse(meta: &[u8]) -> Result<arrow_ipc::Message<'_>> {
    arrow_ipc::root_as_message(meta).map_err(|e| {
        integrity(format!(
            "a message of the sealed stream does not parse: {e}"
        ))
    })
}

fn integrity(what: impl Into<String>) -> Error {
    Error::Integrity(what.into())
}

/// The error of a read of sealed data: an integrity failure, or plain I/O (internal).
pub(crate) fn io_to_integrity(e: std::io::Error) -> Error {
    if crate::crypto::seal::is_integrity_error(&e) {
        Error::Integrity(e.to_string())
    } else {
        Error::internal(format!("reading sealed file: {e}"))
    }
}

/// The error of decoding sealed data.
pub(crate) fn arrow_to_integrity(e: ArrowError) -> Error {
    match e {
        ArrowError::IoError(_, io) => io_to_integrity(io),
        // Authenticated bytes that do not decode: written by a bug, not by an attacker.
        other => Error::Integrity(format!("sealed data does not decode: {other}")),
    }
}

/// Where one top-level column lies in a record batch: its buffers (indices in the message's
/// list) and the byte range of the body they span.
struct Column {
    buffers: std::ops::Range<usize>,
    bytes: (u64, u64),
}

/// Per top-level column of `schema`, where it lies in the batch's body; `None` when the
/// layout is not one this walk knows (the batch is then read whole).
fn column_layout(
    schema: &arrow_schema::Schema,
    batch: &arrow_ipc::RecordBatch<'_>,
    version: MetadataVersion,
) -> Option<Vec<Column>> {
    let buffers = batch.buffers()?;
    let mut variadic = batch.variadicBufferCounts().into_iter().flatten();
    let mut next = 0usize;
    let mut ranges = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let count = buffer_count(field, &mut variadic, version)?;
        let (mut from, mut to) = (u64::MAX, 0u64);
        for i in next..next.checked_add(count)? {
            if i >= buffers.len() {
                return None;
            }
            let b = buffers.get(i);
            let (offset, length) = (
                u64::try_from(b.offset()).ok()?,
                u64::try_from(b.length()).ok()?,
            );
            if length > 0 {
                from = from.min(offset);
                to = to.max(offset.checked_add(length)?);
            }
        }
        ranges.push(Column {
            buffers: next..next + count,
            bytes: if from < to { (from, to) } else { (0, 0) },
        });
        next += count;
    }
    // Every buffer and every variadic count accounted for, or the walk is not trusted.
    (next == buffers.len() && variadic.next().is_none()).then_some(ranges)
}

/// How many IPC buffers a column of `field`'s type has (Arrow's IPC format: the same walk
/// arrow-ipc's reader makes to skip a column).
fn buffer_count(
    field: &Field,
    variadic: &mut impl Iterator<Item = i64>,
    version: MetadataVersion,
) -> Option<usize> {
    use DataType::*;
    let mut children = |fields: Vec<&Field>| -> Option<usize> {
        let mut n = 0usize;
        for f in fields {
            n = n.checked_add(buffer_count(f, variadic, version)?)?;
        }
        Some(n)
    };
    Some(match field.data_type() {
        Null => 0,
        Boolean
        | Int8
        | Int16
        | Int32
        | Int64
        | UInt8
        | UInt16
        | UInt32
        | UInt64
        | Float16
        | Float32
        | Float64
        | Timestamp(_, _)
        | Date32
        | Date64
        | Time32(_)
        | Time64(_)
        | Duration(_)
        | Interval(_)
        | Decimal32(_, _)
        | Decimal64(_, _)
        | Decimal128(_, _)
        | Decimal256(_, _)
        | FixedSizeBinary(_)
        | Dictionary(_, _) => 2,
        Utf8 | Binary | LargeUtf8 | LargeBinary => 3,
        Utf8View | BinaryView => 2 + usize::try_from(variadic.next()?).ok()?,
        List(f) | LargeList(f) | Map(f, _) => 2 + children(vec![f.as_ref()])?,
        ListView(f) | LargeListView(f) => 3 + children(vec![f.as_ref()])?,
        FixedSizeList(f, _) => 1 + children(vec![f.as_ref()])?,
        Struct(fields) => 1 + children(fields.iter().map(|f| f.as_ref()).collect())?,
        RunEndEncoded(r, v) => children(vec![r.as_ref(), v.as_ref()])?,
        Union(fields, mode) => {
            let own = usize::from(version < MetadataVersion::V5)
                + 1
                + usize::from(*mode == UnionMode::Dense);
            own + children(fields.iter().map(|(_, f)| f.as_ref()).collect())?
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{Int32Builder, ListBuilder, StringDictionaryBuilder};
    use arrow_array::types::Int32Type;
    use arrow_array::*;
    use arrow_schema::{DataType, Field, Fields};

    use super::*;
    use crate::crypto::seal::{Binding, SealWriter};

    const BIND: Binding = Binding {
        dataset: [1; 16],
        version: [2; 16],
    };
    const DEK: [u8; 32] = [7; 32];

    /// Batches of most types an upload can hold, nulls included.
    fn batches(rows: usize, count: usize) -> Vec<RecordBatch> {
        (0..count)
            .map(|b| {
                let n = |i: usize| (i + b) % 7 != 3;
                let text: StringArray = (0..rows)
                    .map(|i| n(i).then(|| format!("company {} of batch {b}", i * 31)))
                    .collect();
                let ints: Int64Array = (0..rows)
                    .map(|i| n(i + 1).then_some(i as i64 * 3))
                    .collect();
                let mut dict = StringDictionaryBuilder::<Int32Type>::new();
                let mut list = ListBuilder::new(Int32Builder::new());
                for i in 0..rows {
                    dict.append_value(["EMEA", "NA", "APAC"][i % 3]);
                    list.append_value((0..(i % 4) as i32).map(Some));
                }
                let strukt = StructArray::new(
                    Fields::from(vec![Field::new("a", DataType::Utf8, true)]),
                    vec![Arc::new(text.clone()) as ArrayRef],
                    None,
                );
                let view: StringViewArray = (0..rows)
                    .map(|i| Some(format!("a longer view value, number {i:08}")))
                    .collect();
                RecordBatch::try_from_iter(vec![
                    ("text", Arc::new(text.clone()) as ArrayRef),
                    ("ints", Arc::new(ints) as ArrayRef),
                    (
                        "flag",
                        Arc::new(BooleanArray::from_iter(
                            (0..rows).map(|i| n(i).then_some(i % 2 == 0)),
                        )),
                    ),
                    (
                        "day",
                        Arc::new(Date32Array::from_iter_values((0..rows).map(|i| i as i32))),
                    ),
                    (
                        "at",
                        Arc::new(TimestampMicrosecondArray::from_iter_values(
                            (0..rows).map(|i| i as i64),
                        )),
                    ),
                    ("region", Arc::new(dict.finish())),
                    ("nothing", Arc::new(NullArray::new(rows))),
                    ("list", Arc::new(list.finish())),
                    ("record", Arc::new(strukt)),
                    ("view", Arc::new(view)),
                    (
                        "large",
                        Arc::new(LargeStringArray::from_iter_values(
                            (0..rows).map(|i| format!("{i}")),
                        )),
                    ),
                    (
                        "money",
                        Arc::new(
                            Decimal128Array::from_iter_values((0..rows).map(|i| i as i128))
                                .with_precision_and_scale(20, 2)
                                .unwrap(),
                        ),
                    ),
                    (
                        "fixed",
                        Arc::new(
                            FixedSizeBinaryArray::try_from_iter(
                                (0..rows).map(|i| (i as u32).to_le_bytes()),
                            )
                            .unwrap(),
                        ),
                    ),
                    (
                        "float",
                        Arc::new(Float64Array::from_iter_values(
                            (0..rows).map(|i| i as f64 / 3.0),
                        )),
                    ),
                ])
                .unwrap()
            })
            .collect()
    }

    /// `batches` sealed into a file with small segments (columns cross their boundaries).
    fn sealed(batches: &[RecordBatch]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sealed");
        let file = std::fs::File::create(&path).unwrap();
        let seal = SealWriter::new(file, &DEK, BIND, 4096).unwrap();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(seal, &batches[0].schema()).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        w.into_inner().unwrap().finish().unwrap();
        (dir, path)
    }

    /// Where the first record batch's body starts, and its columns' ranges in it.
    fn first_batch(path: &std::path::Path) -> (u64, Vec<(u64, u64)>) {
        let source =
            SealedRandomAccess::open(std::fs::File::open(path).unwrap(), &DEK, BIND).unwrap();
        let mut p = ProjectedBatches::new(source, vec![0]).unwrap();
        loop {
            let (meta, body) = p.message().unwrap().unwrap();
            let message = parse(&meta).unwrap();
            if let Some(batch) = message.header_as_record_batch() {
                let layout = column_layout(&p.schema, &batch, message.version()).unwrap();
                return (p.pos, layout.into_iter().map(|c| c.bytes).collect());
            }
            p.pos += body;
        }
    }

    fn read(path: &std::path::Path, columns: &[usize]) -> Result<Vec<RecordBatch>> {
        let source = SealedRandomAccess::open(std::fs::File::open(path)?, &DEK, BIND)?;
        ProjectedBatches::new(source, columns.to_vec())?.collect()
    }

    #[test]
    fn columns_read_alone_are_the_columns_of_the_whole() {
        let written = batches(3000, 3);
        let (_dir, path) = sealed(&written);
        let width = written[0].num_columns();
        let mut projections: Vec<Vec<usize>> = (0..width).map(|c| vec![c]).collect();
        projections.push(vec![0, 5, 9]);
        projections.push(vec![1, 7, 8, 13]);
        projections.push((0..width).collect());
        for columns in projections {
            let got = read(&path, &columns).unwrap();
            assert_eq!(got.len(), written.len());
            for (g, w) in got.iter().zip(&written) {
                assert_eq!(g, &w.project(&columns).unwrap(), "columns {columns:?}");
            }
        }
        // The walk knows every column's buffers: each batch was read in parts.
        let (_, ranges) = first_batch(&path);
        assert_eq!(ranges.len(), width);
        // A column read holds its own bytes, not the message body it came in (a
        // dictionary's values come from their own message).
        for (c, &(from, to)) in ranges.iter().enumerate() {
            let got = read(&path, &[c]).unwrap();
            let column = got[0].column(0);
            if matches!(column.data_type(), DataType::Dictionary(_, _)) {
                continue;
            }
            let mut meter = crate::cache::MemoryMeter::default();
            meter.add_array(column.as_ref());
            assert!(
                meter.bytes() <= (to - from) as usize,
                "column {c}: {} bytes held for {} read",
                meter.bytes(),
                to - from
            );
        }
        assert!(
            ranges
                .windows(2)
                .all(|w| w[0].1 <= w[1].0 || w[1] == (0, 0))
        );
    }

    #[test]
    fn what_is_read_authenticates_and_the_end_is_checked() {
        let written = batches(3000, 2);
        let (_dir, path) = sealed(&written);
        let clean = std::fs::read(&path).unwrap();
        // A byte changed in the first column's data fails a read of that column.
        let mut bad = clean.clone();
        let at = crate::crypto::seal::HEADER_LEN + 4096 + 100;
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(read(&path, &[0]), Err(Error::Integrity(_))));
        // Cut at a segment boundary, or with bytes appended: refused whatever is read.
        let segment = 4096 + 16;
        let cut = crate::crypto::seal::HEADER_LEN
            + segment * ((clean.len() - crate::crypto::seal::HEADER_LEN) / segment - 1);
        std::fs::write(&path, &clean[..cut]).unwrap();
        assert!(read(&path, &[0]).is_err());
        let mut tagged = clean[..cut].to_vec();
        tagged.extend_from_slice(&[0; 16]);
        std::fs::write(&path, &tagged).unwrap();
        assert!(
            read(&path, &[0]).is_err(),
            "cut, with an empty last segment appended"
        );
        let mut longer = clean.clone();
        longer.extend_from_slice(&[0; 40]);
        std::fs::write(&path, &longer).unwrap();
        assert!(read(&path, &[0]).is_err());
        std::fs::write(&path, &clean).unwrap();
        assert_eq!(read(&path, &[0]).unwrap().len(), 2);
        // Segments of columns not read are not decrypted: a byte changed in the middle of
        // the last column of the first batch fails a read of that column only.
        let (body, ranges) = first_batch(&path);
        let last = ranges.len() - 1;
        let (from, to) = ranges[last];
        assert!(to - from > 3 * 4096, "{from}..{to}");
        let plain = body + (from + to) / 2;
        let at =
            crate::crypto::seal::HEADER_LEN as u64 + (plain / 4096) * segment as u64 + plain % 4096;
        let mut bad = clean.clone();
        bad[at as usize] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let got = read(&path, &[0, 1]).unwrap();
        assert_eq!(got[0], written[0].project(&[0, 1]).unwrap());
        assert!(matches!(read(&path, &[last]), Err(Error::Integrity(_))));
    }
}
