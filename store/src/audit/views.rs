//! Reading the log: listings and exports for a viewer, with what it may not see redacted.

use std::io::{BufRead, BufReader, Write};

use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AuditLog, Event, Line, Record};
use crate::catalog::Catalog;
use crate::{Error, Result};

/// Which records an export or listing shows in full.
#[derive(Debug, Clone)]
pub enum Viewer {
    /// The operator: everything.
    Operator,
    /// A partner's compliance officer or admin: its own events and those touching its data.
    Partner(String),
}

impl Viewer {
    fn sees(&self, e: &Event) -> bool {
        match self {
            Viewer::Operator => true,
            Viewer::Partner(p) => e.visible_to(p),
        }
    }
}

/// Parse a `--since` time (RFC 3339).
pub fn parse_since(s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        Error::bad(
            "invalid_request",
            format!("since must be an RFC 3339 time such as 2026-11-21T09:00:00Z, got {s:?}"),
        )
    })
}

/// The records `viewer` may see, oldest first, optionally only those at or after `since`.
pub fn list(
    log: &AuditLog,
    catalog: &Catalog,
    viewer: &Viewer,
    since: Option<OffsetDateTime>,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for_each_line(log, catalog, |_, line| {
        if let Some(raw) = line.record {
            let r = parse_record(raw)?;
            let recent = || {
                OffsetDateTime::parse(&r.time, &Rfc3339)
                    .map(|t| since.is_none_or(|s| t >= s))
                    .unwrap_or(true)
            };
            if viewer.sees(&r.event) && recent() {
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The log as JSON lines for `viewer`: records it may not see are redacted to their
/// hashes and signatures, so the whole chain still verifies.
pub fn export(
    log: &AuditLog,
    catalog: &Catalog,
    viewer: &Viewer,
    out: &mut impl Write,
) -> Result<u64> {
    let mut n = 0;
    for_each_line(log, catalog, |text, line| {
        let hidden = match line.record {
            Some(raw) => !viewer.sees(&parse_record(raw)?.event),
            None => false,
        };
        if hidden {
            let redacted = Line {
                record: None,
                redacted: true,
                ..line
            };
            serde_json::to_writer(&mut *out, &redacted).map_err(Error::internal)?;
        } else {
            out.write_all(text.as_bytes())?;
        }
        out.write_all(b"\n")?;
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

fn parse_record(raw: &RawValue) -> Result<Record> {
    serde_json::from_str(raw.get()).map_err(|e| Error::internal(format!("audit record: {e}")))
}

fn for_each_line(
    log: &AuditLog,
    catalog: &Catalog,
    mut f: impl FnMut(&str, Line<'_>) -> Result<()>,
) -> Result<()> {
    let Some(lines) = log.reader(catalog)? else {
        return Ok(());
    };
    let mut reader = BufReader::new(lines);
    let mut buf = String::new();
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 || !buf.ends_with('\n') {
            // End, or a torn last line (never acknowledged; the next append removes it).
            return Ok(());
        }
        let text = buf.trim_end_matches('\n');
        let line: Line<'_> = serde_json::from_str(text)
            .map_err(|e| Error::internal(format!("audit log line: {e}")))?;
        f(text, line)?;
    }
}
