//! The company key escrow computes at upload for each row of an Arrow IPC file, one per line
//! (empty for unmatched rows), for measuring matching quality against a generator's ground
//! truth (bench/overlap.sh). It reads plaintext the caller already has; escrow never exports
//! keys.
//!
//!     cargo run --release --example company_keys -- FILE.arrow WEBSITE_COLUMN [NAME_COLUMN]

use std::io::{BufWriter, Write};

use anyhow::{Context, bail};
use arrow_ipc::reader::FileReader;
use escrow::matching::{MatchStats, company_keys};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (file, website, name) = match args.as_slice() {
        [f, w] => (f, w, None),
        [f, w, n] => (f, w, Some(n)),
        _ => bail!("usage: company_keys FILE.arrow WEBSITE_COLUMN [NAME_COLUMN]"),
    };
    let reader = FileReader::try_new(std::fs::File::open(file).context("open")?, None)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut stats = MatchStats::default();
    for batch in reader {
        let batch = batch?;
        let w = batch
            .column_by_name(website)
            .with_context(|| format!("no column {website}"))?;
        let n = match name {
            Some(n) => Some(
                batch
                    .column_by_name(n)
                    .with_context(|| format!("no column {n}"))?
                    .as_ref(),
            ),
            None => None,
        };
        let keys = company_keys(w.as_ref(), n, &mut stats)?;
        let keys = keys
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .context("keys are text")?;
        for k in keys.iter() {
            writeln!(out, "{}", k.unwrap_or(""))?;
        }
    }
    out.flush()?;
    eprintln!(
        "by_domain={} by_name={} unmatched={}",
        stats.by_domain, stats.by_name, stats.unmatched
    );
    Ok(())
}
