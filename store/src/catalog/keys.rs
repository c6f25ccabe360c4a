//! Table group `kek_state` and the wrapped data keys of `dataset_versions`: which
//! key-encryption key wraps new data keys, and rotation.

use super::Catalog;
use super::sql::{Tx, params};
use crate::{Error, Result};

impl Catalog {
    /// Record `id` as the current key-encryption key unless one is recorded (a new or older
    /// data directory); returns the recorded one.
    pub fn ensure_current_kek(&self, id: &str) -> Result<String> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO kek_state (id, current) VALUES (1, ?1) ON CONFLICT DO NOTHING",
                params![id],
            )?;
            current_kek_in(tx)
        })
    }

    /// The key-encryption key new data keys are wrapped under.
    pub fn current_kek(&self) -> Result<String> {
        self.read(current_kek_in)
    }

    /// Every key-encryption key some data key is wrapped under.
    pub fn kek_ids_in_use(&self) -> Result<Vec<String>> {
        self.read(|tx| tx.column("SELECT DISTINCT kek_id FROM dataset_versions", params![]))
    }
}

/// Re-wrap every data key wrapped under `from` with `rewrap(dataset_id, version_id,
/// wrapped)` and make `to` the current key, in `tx`. Inside it, the inventory must show no
/// data key wrapped under anything but `to`, or the transaction fails. Returns the number
/// re-wrapped.
pub fn rewrap_all(
    tx: &Tx<'_>,
    from: &str,
    to: &str,
    rewrap: impl Fn(&str, &str, &[u8]) -> Result<Vec<u8>>,
) -> Result<usize> {
    let current = current_kek_in(tx)?;
    if current != from {
        return Err(Error::Conflict(format!(
            "the catalog's current key-encryption key is {current}, not {from}"
        )));
    }
    let rows = tx.rows(
        "SELECT dataset_id, version_id, wrapped_dek FROM dataset_versions WHERE kek_id = ?1",
        params![from],
    )?;
    for r in &rows {
        let (dataset_id, version_id): (String, String) = (r.get(0)?, r.get(1)?);
        let new = rewrap(&dataset_id, &version_id, &r.get::<Vec<u8>>(2)?)?;
        tx.execute(
            "UPDATE dataset_versions SET wrapped_dek = ?3, kek_id = ?4
             WHERE dataset_id = ?1 AND version_id = ?2",
            params![dataset_id, version_id, new, to],
        )?;
    }
    tx.execute(
        "UPDATE kek_state SET current = ?1 WHERE id = 1",
        params![to],
    )?;
    super::data_changed(tx)?;
    let left: i64 = tx.value(
        "SELECT COUNT(*) FROM dataset_versions WHERE kek_id <> ?1",
        params![to],
    )?;
    if left != 0 {
        return Err(Error::internal(format!(
            "{left} data keys are wrapped under neither {from} nor {to}"
        )));
    }
    Ok(rows.len())
}

/// The id of the key-encryption key that wraps new data keys.
pub(super) fn current_kek_in(tx: &Tx<'_>) -> Result<String> {
    tx.row("SELECT current FROM kek_state WHERE id = 1", params![])?
        .ok_or_else(|| Error::internal("the catalog records no current key-encryption key"))?
        .get(0)
}
