//! The catalog's seam to its database: statements with typed values, run in a transaction
//! of a [`Backend`] (SQLite for one node, PostgreSQL for several).
//!
//! The catalog's SQL is written once, in the subset both databases understand: `?N`
//! parameters (PostgreSQL is handed `$N`), `ON CONFLICT` rather than `INSERT OR ...`, no
//! `rowid`, `"user"` quoted (unquoted, PostgreSQL reads it as `current_user`). Values cross
//! the seam as [`Value`]s, so a backend converts to and from its own types in one place and
//! a statement means the same on both.

use crate::Result;

/// One SQL value as the catalog stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Self {
        Value::Blob(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of one statement: `params![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! params {
    () => { &[] as &[$crate::catalog::sql::Value] };
    ($($v:expr),+ $(,)?) => { &[$($crate::catalog::sql::Value::from($v)),+] as &[$crate::catalog::sql::Value] };
}
pub(crate) use params;

/// A Rust value read back from a [`Value`].
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Real(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as a `T`; an internal error if it is missing or of another type (the
    /// schema and the statement disagree).
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| crate::Error::internal(format!("catalog: no column {i}")))?;
        T::from_value(v).ok_or_else(|| {
            crate::Error::internal(format!(
                "catalog: column {i} holds {v:?}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Statements on one open transaction of a backend.
pub trait Conn {
    /// Run a statement; the number of rows it changed.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<usize>;
    /// Run a query; every row.
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// Run a script of statements without parameters (the schema).
    fn batch(&self, sql: &str) -> Result<()>;
    /// Run `statements` in order as the transaction commits: now, in a backend inside the
    /// process; with the commit, in one round trip, in a backend across a network (a
    /// failure then fails the commit).
    fn execute_at_commit(&self, statements: Vec<(String, Vec<Value>)>) -> Result<()> {
        for (sql, params) in &statements {
            self.execute(sql, params)?;
        }
        Ok(())
    }
}

/// An open catalog transaction: what the catalog's table groups and the audit writer run
/// their statements in. A write transaction commits when the function given to
/// [`Backend::run`] returns `Ok` (and is not a dry run), and rolls back otherwise.
pub struct Tx<'a>(pub(crate) &'a dyn Conn);

impl Tx<'_> {
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.0.execute(sql, params)
    }

    pub fn rows(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        self.0.query(sql, params)
    }

    pub fn batch(&self, sql: &str) -> Result<()> {
        self.0.batch(sql)
    }

    /// Run `statements`, in order, as the transaction commits, where the catalog is across a
    /// network together with the commit (one round trip): the last writes of a transaction,
    /// which nothing in it reads afterwards. A statement that fails fails the commit (and
    /// the transaction rolls back); a transaction that is not committed never runs them.
    pub fn execute_at_commit(&self, statements: Vec<(String, Vec<Value>)>) -> Result<()> {
        self.0.execute_at_commit(statements)
    }

    /// The first row, if any.
    pub fn row(&self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.0.query(sql, params)?.into_iter().next())
    }

    /// The first column of the one row a query must return (an aggregate, a singleton).
    pub fn value<T: FromValue>(&self, sql: &str, params: &[Value]) -> Result<T> {
        self.row(sql, params)?
            .ok_or_else(|| crate::Error::internal("catalog: a query returned no row"))?
            .get(0)
    }

    /// Whether the query returns any row.
    pub fn exists(&self, sql: &str, params: &[Value]) -> Result<bool> {
        Ok(self.row(sql, params)?.is_some())
    }

    /// The first column of every row.
    pub fn column<T: FromValue>(&self, sql: &str, params: &[Value]) -> Result<Vec<T>> {
        self.rows(sql, params)?.iter().map(|r| r.get(0)).collect()
    }
}

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads only, on one consistent view.
    Read,
    /// Writes, serialised with every other writer of the catalog (on every node);
    /// committed if the function succeeds.
    Write,
    /// As `Write`, but always rolled back (a question's budget checked, not spent).
    DryRun,
}

/// A database the catalog can live in.
pub trait Backend: Send + Sync {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// Run `f` in one transaction of `mode`.
    fn run(&self, mode: Mode, f: &mut dyn FnMut(&Tx<'_>) -> Result<()>) -> Result<()>;
    /// After rows holding key material were deleted: make the database drop them from
    /// wherever it still keeps them (SQLite: its write-ahead log).
    fn purge(&self) -> Result<()>;
}

/// `sql` with SQLite's `?N` parameters written as PostgreSQL's `$N` (outside quotes).
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') if chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            (None, c) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_dollar_parameters_outside_quotes_only() {
        assert_eq!(
            dollar_params("SELECT '?1', \"a?2\" FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', \"a?2\" FROM t WHERE a = $1 AND b = $12"
        );
    }

    #[test]
    fn values_read_back_as_their_types_only() {
        let row = Row(vec![
            Value::Int(3),
            Value::Null,
            Value::Text("x".into()),
            Value::Real(0.5),
        ]);
        assert_eq!(row.get::<i64>(0).expect("int"), 3);
        assert_eq!(row.get::<f64>(0).expect("int as real"), 3.0);
        assert_eq!(row.get::<Option<String>>(1).expect("null"), None);
        assert!(row.get::<String>(1).is_err());
        assert!(row.get::<i64>(2).is_err());
        assert_eq!(row.get::<f64>(3).expect("real"), 0.5);
        assert!(row.get::<i64>(9).is_err());
    }
}
