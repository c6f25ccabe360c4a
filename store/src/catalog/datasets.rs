//! Table group `datasets`, `dataset_versions`: each partner's datasets, every version with
//! its wrapped data key, and which of them a partner may name in a question.

use super::keys::current_kek_in;
use super::policy::record_policy_version;
use super::sql::{Row, Tx, params};
use super::{
    Catalog, DatasetInfo, NewVersion, QueryableDataset, VersionInfo, VersionKey, now_rfc3339,
};
use crate::model::policy::PolicyVersion;
use crate::{Error, Result};

impl Catalog {
    /// The id of `owner`'s dataset `name`, creating the dataset row if needed.
    /// A dataset row without versions is invisible and removed at startup.
    pub fn dataset_id_for_upload(&self, owner: &str, name: &str, new_id: &str) -> Result<String> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO datasets (id, owner, name, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![new_id, owner, name, now_rfc3339()],
            )?;
            tx.value(
                "SELECT id FROM datasets WHERE owner = ?1 AND name = ?2",
                params![owner, name],
            )
        })
    }

    /// The live version of every dataset `owner` has.
    pub fn list_datasets(&self, owner: &str) -> Result<Vec<DatasetInfo>> {
        let rows = self.read(|tx| {
            tx.rows(
                "SELECT d.owner, d.name, v.version, v.rows, v.source_bytes, v.sealed_bytes, v.format,
                        v.key_column, v.schema_json, v.created_at, v.uploaded_by
                 FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
                 WHERE d.owner = ?1
                   AND v.version = (SELECT MAX(version) FROM dataset_versions WHERE dataset_id = d.id)
                 ORDER BY d.name",
                params![owner],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(DatasetInfo {
                    owner: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    rows: r.get(3)?,
                    source_bytes: r.get(4)?,
                    sealed_bytes: r.get(5)?,
                    format: r.get(6)?,
                    key_column: r.get(7)?,
                    columns: serde_json::from_str(&r.get::<String>(8)?)
                        .map_err(|e| Error::internal(format!("bad schema in catalog: {e}")))?,
                    created_at: r.get(9)?,
                    uploaded_by: r.get(10)?,
                })
            })
            .collect()
    }

    /// Every version of `owner`'s dataset `name`, oldest first.
    pub fn dataset_versions(&self, owner: &str, name: &str) -> Result<Vec<VersionInfo>> {
        let rows = self.read(|tx| {
            tx.rows(
                "SELECT v.version, v.rows, v.source_bytes, v.sealed_bytes, v.format, v.key_column,
                        v.schema_json, v.matching, v.created_at, v.uploaded_by
                 FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
                 WHERE d.owner = ?1 AND d.name = ?2
                 ORDER BY v.version",
                params![owner, name],
            )
        })?;
        let bad = |e: serde_json::Error| Error::internal(format!("bad version in catalog: {e}"));
        rows.iter()
            .map(|r| {
                Ok(VersionInfo {
                    version: r.get(0)?,
                    rows: r.get(1)?,
                    source_bytes: r.get(2)?,
                    sealed_bytes: r.get(3)?,
                    format: r.get(4)?,
                    key_column: r.get(5)?,
                    columns: serde_json::from_str(&r.get::<String>(6)?).map_err(bad)?,
                    matching: r
                        .get::<Option<String>>(7)?
                        .map(|m| serde_json::from_str(&m))
                        .transpose()
                        .map_err(bad)?,
                    created_at: r.get(8)?,
                    uploaded_by: r.get(9)?,
                })
            })
            .collect()
    }

    /// Keys of every version of a dataset (newest first).
    pub fn version_keys(&self, owner: &str, name: &str) -> Result<Vec<VersionKey>> {
        self.read(|tx| {
            tx.rows(
                "SELECT d.id, v.version_id, v.version, v.wrapped_dek, v.kek_id
                 FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
                 WHERE d.owner = ?1 AND d.name = ?2 ORDER BY v.version DESC",
                params![owner, name],
            )?
            .iter()
            .map(|r| version_key(r, 0))
            .collect()
        })
    }

    /// Whether the catalog lists this version (a commit whose outcome was not seen, or an
    /// object about to be removed as an orphan).
    pub fn version_exists(&self, dataset_id: &str, version_id: &str) -> Result<bool> {
        self.read(|tx| {
            tx.exists(
                "SELECT 1 FROM dataset_versions WHERE dataset_id = ?1 AND version_id = ?2",
                params![dataset_id, version_id],
            )
        })
    }

    /// Every (dataset id, version id) with a catalog row: used to find orphan files.
    pub fn all_version_ids(&self) -> Result<Vec<(String, String)>> {
        self.read(|tx| {
            tx.rows(
                "SELECT dataset_id, version_id FROM dataset_versions",
                params![],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
    }

    /// Remove dataset rows that never got a version (uploads that did not complete), or
    /// only those created before `before` (RFC 3339; other nodes' uploads may be running).
    pub fn remove_empty_datasets(&self, before: Option<&str>) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM datasets WHERE NOT EXISTS
                   (SELECT 1 FROM dataset_versions v WHERE v.dataset_id = datasets.id)
                   AND (CAST(?1 AS TEXT) IS NULL OR created_at < ?1)",
                params![before],
            )
        })
    }

    /// The live version of every dataset `partner` may name in a query: its own and those
    /// with at least one grant to it (or to every partner).
    pub fn queryable(&self, partner: &str) -> Result<Vec<QueryableDataset>> {
        self.read(|tx| {
            tx.rows(
                "SELECT d.owner, d.name, v.key_column, d.id, v.version_id, v.version, v.wrapped_dek, v.kek_id,
                        v.rows
                 FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
                 WHERE v.version = (SELECT MAX(version) FROM dataset_versions WHERE dataset_id = d.id)
                   AND (d.owner = ?1 OR EXISTS (SELECT 1 FROM grants g
                         WHERE g.owner = d.owner AND g.dataset = d.name
                           AND (g.grantee = ?1 OR g.grantee = '*')))
                 ORDER BY d.owner, d.name",
                params![partner],
            )?
            .iter()
            .map(|r| {
                Ok(QueryableDataset {
                    owner: r.get(0)?,
                    name: r.get(1)?,
                    key_column: r.get(2)?,
                    live: version_key(r, 3)?,
                    rows: r.get(8)?,
                })
            })
            .collect()
        })
    }
}

/// Record a complete version in `tx`; it becomes the live one. Returns its version number.
/// `wrap` wraps the version's data key under the current key-encryption key (its id is
/// given), inside the transaction, so a rotation cannot slip between wrap and commit.
pub fn commit_version(
    tx: &Tx<'_>,
    v: &NewVersion,
    wrap: impl FnOnce(&str) -> Result<Vec<u8>>,
) -> Result<i64> {
    if !tx.exists(
        "SELECT 1 FROM datasets WHERE id = ?1",
        params![&v.dataset_id],
    )? {
        return Err(Error::Conflict(
            "the dataset was deleted while this upload was in progress".into(),
        ));
    }
    let version: i64 = tx.value(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM dataset_versions WHERE dataset_id = ?1",
        params![&v.dataset_id],
    )?;
    let schema_json = serde_json::to_string(&v.columns).map_err(Error::internal)?;
    let matching = v
        .matching
        .map(|m| serde_json::to_string(&m))
        .transpose()
        .map_err(Error::internal)?;
    let kek_id = current_kek_in(tx)?;
    let wrapped_dek = wrap(&kek_id)?;
    tx.execute(
        "INSERT INTO dataset_versions (dataset_id, version, version_id, rows, source_bytes,
            sealed_bytes, format, schema_json, key_column, wrapped_dek, kek_id, uploaded_by, created_at,
            matching)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            &v.dataset_id,
            version,
            &v.version_id,
            v.rows,
            v.source_bytes,
            v.sealed_bytes,
            &v.format,
            schema_json,
            v.key_column.as_deref(),
            wrapped_dek,
            kek_id,
            &v.uploaded_by,
            now_rfc3339(),
            matching
        ],
    )?;
    super::data_changed(tx)?;
    Ok(version)
}

/// What deleting a dataset removed.
#[derive(Debug)]
pub struct Deleted {
    pub dataset_id: String,
    /// Versions destroyed (each with its wrapped data key).
    pub versions: usize,
    /// The owner's policy version the removal of the dataset's rules wrote, if any.
    pub policy: Option<PolicyVersion>,
}

/// Delete a dataset and every version row (with its wrapped key) in `tx`; `not_found` if the
/// owner has no such dataset. After the commit, [`Catalog::purge`] removes the rows from
/// wherever the database still keeps them.
pub fn delete_dataset(tx: &Tx<'_>, owner: &str, name: &str, by: &str) -> Result<Deleted> {
    let id: Option<String> = tx
        .row(
            "SELECT id FROM datasets d WHERE owner = ?1 AND name = ?2
               AND EXISTS (SELECT 1 FROM dataset_versions v WHERE v.dataset_id = d.id)",
            params![owner, name],
        )?
        .map(|r| r.get(0))
        .transpose()?;
    let Some(id) = id else {
        return Err(Error::NotFound(format!("no dataset named {name}")));
    };
    // Answers computed from these versions go with them.
    for table in ["released_answers", "released_overlaps"] {
        tx.execute(
            &format!(
                "DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM dataset_versions v
                   WHERE v.dataset_id = ?1 AND versions LIKE ('% ' || v.version_id || ' %'))"
            ),
            params![id.as_str()],
        )?;
    }
    let n = tx.execute(
        "DELETE FROM dataset_versions WHERE dataset_id = ?1",
        params![id.as_str()],
    )?;
    // Consent was given for this dataset; a later upload under the same name starts bare.
    for table in ["grants", "dataset_settings", "populations"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE owner = ?1 AND dataset = ?2"),
            params![owner, name],
        )?;
    }
    tx.execute("DELETE FROM datasets WHERE id = ?1", params![id.as_str()])?;
    super::data_changed(tx)?;
    Ok(Deleted {
        dataset_id: id,
        versions: n,
        policy: record_policy_version(tx, owner, by, "dataset_delete")?,
    })
}

/// A `VersionKey` from columns `first..first + 5` of a row: dataset id, version id, version,
/// wrapped DEK, KEK id.
fn version_key(r: &Row, first: usize) -> Result<VersionKey> {
    Ok(VersionKey {
        dataset_id: r.get(first)?,
        version_id: r.get(first + 1)?,
        version: r.get(first + 2)?,
        wrapped_dek: r.get(first + 3)?,
        kek_id: r.get(first + 4)?,
    })
}
