//! The companies escrow finds in common between two Arrow IPC files, computed by the code an
//! upload and an overlap run (company and name keys at ingest, the overlap engine's folds
//! and links), for measuring matching quality against a generator's ground truth
//! (bench/overlap.sh). It reads plaintext the caller already has; escrow never exports keys
//! or matches.
//!
//!     cargo run --release --example overlap_matches -- A.arrow B.arrow WEBSITE NAME [CONTEXT,..|none] OUTDIR
//!
//! Without CONTEXT, places are detected from the headers as an upload does by default
//! (`upload --places`); with name-context columns there are none, as in an upload; `none`
//! is an upload with `--places none`.
//!
//! Writes OUTDIR/entities-a.txt and entities-b.txt (per row, the entity it counts as, in hex;
//! empty for unmatched rows) and OUTDIR/matches.txt (one `a b` pair of entities per common
//! company).

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::{Array, ArrayRef, RecordBatch, UInt64Array};
use arrow_ipc::reader::FileReader;
use arrow_schema::{DataType, Field, Schema};
use escrow::matching::{MatchStats, Names, company_keys, detect_places, place_keys, place_kinds};
use escrow_query::overlap::{self, Membership, Side};
use escrow_query::source::EntityHasher;

/// One file's rows as entity ids, and its reduced side.
fn side(
    file: &str,
    website: &str,
    name: &str,
    context: &[&str],
) -> anyhow::Result<(Vec<Option<u64>>, Membership)> {
    let hasher = EntityHasher::new([7; 16]);
    let reader = FileReader::try_new(std::fs::File::open(file).context("open")?, None)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::UInt64, true),
        Field::new("name", DataType::UInt64, true),
        Field::new("place", DataType::UInt64, true),
    ]));
    let places = match context {
        [] => detect_places(&reader.schema(), &[website, name]),
        _ => Vec::new(),
    };
    let context: Vec<&str> = context.iter().copied().filter(|c| *c != "none").collect();
    let mut stats = MatchStats::default();
    let mut ids = Vec::new();
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch?;
        let column = |c: &str| -> anyhow::Result<ArrayRef> {
            batch
                .column_by_name(c)
                .cloned()
                .with_context(|| format!("no column {c}"))
        };
        let context_columns = context
            .iter()
            .map(|c| column(c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let context_refs: Vec<&dyn Array> = context_columns.iter().map(|c| c.as_ref()).collect();
        let name_column = column(name)?;
        let names = Names {
            name: name_column.as_ref(),
            context: &context_refs,
        };
        let (keys, name_keys) = company_keys(column(website)?.as_ref(), Some(names), &mut stats)?;
        let key_ids = hasher.ids(keys.as_ref())?;
        let name_ids = hasher.ids(name_keys.context("name keys")?.as_ref())?;
        let place_columns = places
            .iter()
            .map(|c| Ok((c.as_str(), column(c)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let place_refs: Vec<(&str, &dyn Array)> = place_columns
            .iter()
            .map(|(c, a)| (*c, a.as_ref()))
            .collect();
        let place_ids = match places.is_empty() {
            true => Arc::new(UInt64Array::new_null(key_ids.len())) as ArrayRef,
            false => hasher.ids(place_keys(&place_refs)?.as_ref())?,
        };
        let k = key_ids
            .as_any()
            .downcast_ref::<UInt64Array>()
            .context("ids")?;
        ids.extend(k.iter());
        batches.push(RecordBatch::try_new(
            schema.clone(),
            vec![key_ids, name_ids, place_ids],
        )?);
    }
    let side = Side {
        populations: Vec::new(),
        key_index: 0,
        dimension: None,
        names: Some(1),
        places: (!places.is_empty()).then(|| overlap::Places {
            index: 2,
            kinds: place_kinds(&places),
        }),
    };
    let membership = overlap::memberships(&side, batches.into_iter().map(Ok), usize::MAX)?;
    eprintln!(
        "{file}: places={} by_domain={} by_name={} unmatched={} folded={}",
        places.join(","),
        stats.by_domain,
        stats.by_name,
        stats.unmatched,
        membership.folded()
    );
    Ok((ids, membership))
}

fn write_entities(path: &Path, ids: &[Option<u64>], m: &Membership) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for id in ids {
        match id {
            Some(id) => writeln!(out, "{:x}", m.entity_of(*id))?,
            None => writeln!(out)?,
        }
    }
    Ok(out.flush()?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (a, b, website, name, context, out) = match args.as_slice() {
        [a, b, w, n, o] => (a, b, w, n, "", o),
        [a, b, w, n, c, o] => (a, b, w, n, c.as_str(), o),
        _ => bail!("usage: overlap_matches A.arrow B.arrow WEBSITE NAME [CONTEXT,..] OUTDIR"),
    };
    let context: Vec<&str> = context.split(',').filter(|c| !c.is_empty()).collect();
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let (ids_a, ma) = side(a, website, name, &context)?;
    let (ids_b, mb) = side(b, website, name, &context)?;
    write_entities(&out.join("entities-a.txt"), &ids_a, &ma)?;
    write_entities(&out.join("entities-b.txt"), &ids_b, &mb)?;
    let mut pairs = BufWriter::new(std::fs::File::create(out.join("matches.txt"))?);
    let mut n = 0u64;
    for (x, y) in overlap::matches(&ma, &mb) {
        writeln!(pairs, "{x:x} {y:x}")?;
        n += 1;
    }
    pairs.flush()?;
    eprintln!("common companies: {n}");
    Ok(())
}
