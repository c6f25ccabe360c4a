//! The byte form of what a reduction keeps, for the service to seal beside a dataset version
//! (`overlap::Membership::encode`, `exec::encode_keys`): little-endian values, read back with
//! every length checked, so that bytes that do not fit are an error, never a panic or an
//! allocation the bytes chose.

use crate::QueryError;

fn internal(m: &str) -> QueryError {
    QueryError::Internal(m.to_string())
}

/// Little-endian values appended to a buffer.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Little-endian values read from a buffer, every length checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    /// Bytes not read yet.
    pub(crate) fn left(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], QueryError> {
        if n > self.bytes.len() {
            return Err(internal("a kept form: truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, QueryError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, QueryError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, QueryError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    /// A count of items of at least `each` bytes that the rest can hold.
    pub(crate) fn len(&mut self, each: usize) -> Result<usize, QueryError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.bytes.len() {
            return Err(internal("a kept form: a count past its end"));
        }
        Ok(n)
    }
    pub(crate) fn str(&mut self) -> Result<String, QueryError> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| internal("a kept form: text"))
    }
    /// `n` values of `W` bytes each.
    pub(crate) fn column<const W: usize>(&mut self, n: usize) -> Result<&'a [[u8; W]], QueryError> {
        let bytes = self.take(n.checked_mul(W).ok_or_else(|| internal("overflow"))?)?;
        let (chunks, rest) = bytes.as_chunks::<W>();
        debug_assert!(rest.is_empty());
        Ok(chunks)
    }
}
