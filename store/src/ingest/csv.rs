//! CSV: delimiter sniffed, types inferred from a bounded sample, rows read in batches.

use super::*;

pub(super) fn csv_batches<'a, R: Read + 'a>(
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
            "malformed CSV: a value does not match the column type inferred from the first rows",
        ),
        ArrowError::IoError(..) | ArrowError::ExternalError(_) => Error::Interrupted,
        _ => Error::bad("malformed_csv", "malformed CSV"),
    }
}
