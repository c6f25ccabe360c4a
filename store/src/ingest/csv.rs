//! CSV: delimiter sniffed, types inferred from a bounded sample (or declared by the
//! uploader), rows read in batches.

use arrow_schema::{Field, Schema, TimeUnit};

use super::*;

/// Column types an uploader declares for a CSV (`escrow upload --schema COL=TYPE`), used
/// instead of the types inferred from the first rows: a CRM export whose column holds whole
/// numbers for ten thousand rows and then a decimal, say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeclaredSchema(Vec<(String, DataType)>);

/// The declared columns' positions and types.
type Declared = Vec<(usize, DataType)>;

/// The type names `--schema` takes, and what each reads as.
const DECLARABLE: [(&str, DataType); 6] = [
    ("string", DataType::Utf8),
    ("integer", DataType::Int64),
    ("float", DataType::Float64),
    ("boolean", DataType::Boolean),
    ("date", DataType::Date32),
    (
        "timestamp",
        DataType::Timestamp(TimeUnit::Microsecond, None),
    ),
];

impl DeclaredSchema {
    /// From `COL=TYPE` declarations (the type after the last `=`; `string`, `integer`,
    /// `float`, `boolean`, `date` or `timestamp`), each column once.
    pub fn parse<'s>(declarations: impl IntoIterator<Item = &'s str>) -> Result<Self> {
        let mut out: Vec<(String, DataType)> = Vec::new();
        for d in declarations {
            let bad = |why: String| Error::bad("bad_schema", format!("--schema {d:?}: {why}"));
            let (column, type_name) = d
                .rsplit_once('=')
                .ok_or_else(|| bad("not COLUMN=TYPE".into()))?;
            let column = column.trim();
            if column.is_empty() || column.contains(',') {
                return Err(bad(
                    "no column name, or one with a comma (not declarable)".into()
                ));
            }
            let t = DECLARABLE
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(type_name.trim()))
                .map(|(_, t)| t.clone())
                .ok_or_else(|| {
                    let names: Vec<&str> = DECLARABLE.iter().map(|(n, _)| *n).collect();
                    bad(format!("the type is one of {}", names.join(", ")))
                })?;
            if out.iter().any(|(c, _)| c == column) {
                return Err(bad(format!("{column} is declared twice")));
            }
            out.push((column.to_string(), t));
        }
        Ok(DeclaredSchema(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The declarations as the API's `schema` parameter carries them (`COL=TYPE,...`).
    pub fn to_param(&self) -> String {
        self.0
            .iter()
            .map(|(c, t)| format!("{c}={}", declared_name(t).unwrap_or("string")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `inferred` with the declared columns read as text (converted batch by batch, so
    /// that a value that does not fit is found with its row), and the schema the batches
    /// then have; the declared columns' positions.
    fn apply(&self, inferred: &Schema) -> Result<(SchemaRef, SchemaRef, Declared)> {
        let mut read: Vec<Field> = inferred
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut out = read.clone();
        let mut declared = Vec::new();
        for (column, t) in &self.0 {
            let i = inferred.index_of(column).map_err(|_| {
                Error::bad(
                    "bad_schema",
                    format!("--schema names {column}, which is not a column of the file's header"),
                )
            })?;
            read[i] = Field::new(column, DataType::Utf8, true);
            out[i] = Field::new(column, t.clone(), true);
            declared.push((i, t.clone()));
        }
        Ok((
            Arc::new(Schema::new(read)),
            Arc::new(Schema::new(out)),
            declared,
        ))
    }
}

/// The `--schema` name of type `t`, if it is one `--schema` takes.
fn declared_name(t: &DataType) -> Option<&'static str> {
    DECLARABLE.iter().find(|(_, d)| d == t).map(|(n, _)| *n)
}

/// Convert the declared columns of `batch` (read as text) to their types; `rows_before`:
/// rows of the file before this batch. A value that does not convert refuses the upload,
/// naming its row and column but not the value.
fn convert(
    batch: RecordBatch,
    schema: &SchemaRef,
    declared: &[(usize, DataType)],
    rows_before: usize,
) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    for (i, t) in declared {
        let text = &columns[*i];
        let converted = arrow_cast::cast(text, t).map_err(Error::internal)?;
        let strings = text
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .ok_or_else(|| Error::internal("a declared CSV column was not read as text"))?;
        // A safe cast turns what does not convert into null: a null where the text had a
        // value (not an empty cell) is a value that does not fit.
        let misfit = |r: usize| {
            strings.is_valid(r) && !strings.value(r).trim().is_empty() && converted.is_null(r)
        };
        if let Some(row) = (0..text.len()).find(|&r| misfit(r)) {
            return Err(Error::bad(
                "malformed_csv",
                format!(
                    "malformed CSV: data row {}, column {}: the value is not a {} (as --schema declares)",
                    rows_before + row + 1,
                    schema.field(*i).name(),
                    declared_name(t).unwrap_or("value of its type")
                ),
            ));
        }
        columns[*i] = converted;
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(Error::internal)
}

pub(super) fn csv_batches<'a, R: Read + 'a>(
    mut input: BufReader<R>,
    limits: &IngestLimits,
    declared: &DeclaredSchema,
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
    let (read, schema, declared) = declared.apply(&schema)?;
    prefix.drain(..start);
    let reader = arrow_csv::ReaderBuilder::new(read)
        .with_header(true)
        .with_delimiter(delimiter)
        .with_batch_size(limits.batch_rows)
        .build(Cursor::new(prefix).chain(input))
        .map_err(csv_error)?;
    let out = schema.clone();
    let mut rows = 0;
    let batches = reader.map(move |b| {
        let b = b.map_err(csv_error)?;
        let before = rows;
        rows += b.num_rows();
        if declared.is_empty() {
            return Ok(b);
        }
        convert(b, &out, &declared, before)
    });
    Ok(schema_even_if_empty(batches, schema))
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
pub(super) fn schema_even_if_empty<'a>(
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
            "malformed CSV: a value does not match the column type inferred from the first rows (declare the column's type: escrow upload --schema COLUMN=TYPE)",
        ),
        ArrowError::IoError(..) | ArrowError::ExternalError(_) => Error::Interrupted,
        _ => Error::bad("malformed_csv", "malformed CSV"),
    }
}
