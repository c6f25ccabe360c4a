//! The data directory: every path escrow reads or writes, in one place.
//!
//! ```text
//! DIR/escrow.db                     catalog (SQLite, WAL): partners, identities, datasets, wrapped keys
//! DIR/keys/kek                      key-encryption key (32 bytes, 0600)
//! DIR/keys/kek.next                 the next KEK, only while `keys rotate` runs
//! DIR/keys/rotation.lock            locked by `keys rotate` while it runs
//! DIR/keys/noise                    secret seed of differential-privacy noise (32 bytes, 0600)
//! DIR/keys/audit                    Ed25519 seed signing the audit log (32 bytes, 0600)
//! DIR/audit/log.jsonl               audit log: hash-chained, signed JSON lines (audit/), when
//!                                   the catalog is this directory's own (a shared catalog
//!                                   holds the lines as rows)
//! DIR/ca/ca.pem, ca.key, crl.pem    dev certificate authority and its revocation list
//! DIR/tls/server.pem, server.key    server certificate (localhost, 127.0.0.1, ::1)
//! DIR/identities/PARTNER/USER/      client bundles: cert.pem, key.pem, ca.pem
//! DIR/datasets/DATASET_ID/VERSION_ID.sealed   sealed dataset versions (unless --objects names
//!                                   another store: `objects`)
//! DIR/tmp/                          uploads in flight (sealed too); emptied at startup
//! ```

use std::path::{Path, PathBuf};

/// Paths inside one data directory.
#[derive(Clone)]
pub struct DataDir {
    root: PathBuf,
    /// A PostgreSQL catalog shared by several nodes, instead of the directory's own file.
    catalog_url: Option<String>,
    /// An object store shared by several nodes, instead of the directory's `datasets/`.
    objects_url: Option<String>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("root", &self.root)
            .field(
                "catalog_url",
                &self.catalog_url.as_deref().map(crate::catalog::redacted),
            )
            .field(
                "objects_url",
                &self.objects_url.as_deref().map(crate::catalog::redacted),
            )
            .finish()
    }
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir {
            root: root.into(),
            catalog_url: None,
            objects_url: None,
        }
    }
    /// The same directory with its catalog in the PostgreSQL database at `url` (checked when
    /// the catalog is opened).
    pub fn with_catalog(mut self, url: Option<String>) -> Self {
        self.catalog_url = url;
        self
    }
    /// The same directory with its sealed versions in the object store at `url`
    /// (`s3://bucket/prefix`, or another directory).
    pub fn with_objects(mut self, url: Option<String>) -> Self {
        self.objects_url = url;
        self
    }
    /// Where the sealed versions live.
    pub fn objects_location(&self) -> crate::Result<crate::objects::Location> {
        crate::objects::Location::parse(self.objects_url.as_deref(), &self.root)
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The SQLite catalog file (used unless a PostgreSQL catalog is named).
    pub fn catalog(&self) -> PathBuf {
        self.root.join("escrow.db")
    }
    /// Where the catalog lives.
    pub fn catalog_location(&self) -> crate::Result<crate::catalog::Location> {
        match &self.catalog_url {
            Some(url) => crate::catalog::Location::parse_url(url),
            None => Ok(crate::catalog::Location::File(self.catalog())),
        }
    }
    /// The id that binds this directory to its catalog (the catalog holds it too).
    pub fn catalog_id(&self) -> PathBuf {
        self.root.join("catalog.id")
    }

    /// Open this directory's catalog, and check that it is this directory's: a node or an
    /// operator command started without `--catalog` (or with another one) must not take an
    /// empty catalog for the shared one, whose startup recovery would then remove every
    /// sealed file as an orphan. The first open of a directory and a catalog that both have
    /// no id binds them; a SQLite catalog inside the directory is its own.
    pub fn open_catalog(&self) -> crate::Result<crate::catalog::Catalog> {
        let location = self.catalog_location()?;
        let catalog = crate::catalog::Catalog::open_at(&location)?;
        let path = self.catalog_id();
        let mine = match std::fs::read_to_string(&path) {
            Ok(id) => Some(id.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let own_file = matches!(location, crate::catalog::Location::File(_));
        match (mine, catalog.id()?) {
            (Some(mine), Some(theirs)) if mine == theirs => {}
            (Some(mine), Some(theirs)) => {
                return Err(crate::Error::bad(
                    "wrong_catalog",
                    format!(
                        "{} belongs to catalog {mine}, but the catalog named is {theirs}: check --catalog / ESCROW_CATALOG",
                        self.root.display()
                    ),
                ));
            }
            (Some(mine), None) => {
                return Err(crate::Error::bad(
                    "wrong_catalog",
                    format!(
                        "{} belongs to catalog {mine}, but the catalog named is a new one: is --catalog / ESCROW_CATALOG missing or wrong?",
                        self.root.display()
                    ),
                ));
            }
            (None, Some(theirs)) if own_file => {
                crate::fsutil::atomic_write(&path, theirs.as_bytes(), false)?;
            }
            (None, Some(theirs)) => {
                return Err(crate::Error::bad(
                    "wrong_catalog",
                    format!(
                        "the catalog named belongs to another data directory (catalog {theirs}); if it is this one's, write that id to {}",
                        path.display()
                    ),
                ));
            }
            (None, None) => {
                let id = catalog.bind_new_id()?;
                crate::fsutil::atomic_write(&path, id.as_bytes(), false)?;
            }
        }
        Ok(catalog)
    }
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn kek(&self) -> PathBuf {
        self.keys().join("kek")
    }
    /// The next key-encryption key, while a rotation is in progress.
    pub fn kek_next(&self) -> PathBuf {
        self.keys().join("kek.next")
    }
    /// Held (an advisory lock on this file) by `keys rotate` for its whole run, so that no
    /// node's startup recovery settles a rotation another process is in the middle of.
    pub fn rotation_lock(&self) -> PathBuf {
        self.keys().join("rotation.lock")
    }
    /// Where the key-encryption key comes from: these files, unless the environment names
    /// another source (`crypto::keys::KekSource`).
    pub fn kek_source(&self) -> crate::Result<crate::crypto::keys::KekSource> {
        crate::crypto::keys::KekSource::from_env(&self.kek(), &self.kek_next())
    }
    /// Ed25519 seed signing the audit log (32 bytes, 0600).
    pub fn audit_key(&self) -> PathBuf {
        self.keys().join("audit")
    }
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }
    /// The hash-chained audit log (JSON lines, append-only).
    pub fn audit_log(&self) -> PathBuf {
        self.audit_dir().join("log.jsonl")
    }
    pub fn noise_key(&self) -> PathBuf {
        self.keys().join("noise")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.ca_dir().join("ca.key")
    }
    pub fn crl(&self) -> PathBuf {
        self.ca_dir().join("crl.pem")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.tls_dir().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.tls_dir().join("server.key")
    }
    pub fn identities(&self) -> PathBuf {
        self.root.join("identities")
    }
    pub fn identity_bundle(&self, partner: &str, user: &str) -> PathBuf {
        self.identities().join(partner).join(user)
    }
    pub fn datasets(&self) -> PathBuf {
        self.root.join("datasets")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Create the directory tree (private directories for keys and CA).
    pub fn create_dirs(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for (dir, mode) in [
            (self.root.clone(), 0o700),
            (self.keys(), 0o700),
            (self.ca_dir(), 0o700),
            (self.tls_dir(), 0o700),
            (self.identities(), 0o700),
            (self.datasets(), 0o700),
            (self.tmp(), 0o700),
            (self.audit_dir(), 0o700),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&dir)?;
        }
        Ok(())
    }
}

/// Check a partner, user or dataset name (rule: `escrow_policies::is_valid_name`).
pub fn validate_name(kind: &str, name: &str) -> crate::Result<()> {
    if escrow_policies::is_valid_name(name) {
        Ok(())
    } else {
        Err(crate::Error::bad(
            "invalid_name",
            format!("{kind} name must match [a-z][a-z0-9_]{{0,62}}"),
        ))
    }
}
