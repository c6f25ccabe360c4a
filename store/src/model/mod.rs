//! Value types that the catalog stores and the services change: policy documents, their
//! versions and diffs, and protection settings. Below the catalog: nothing here reads or
//! writes storage, so the catalog and every service may import it without a loop.

pub mod enrollment;
pub mod policy;
pub mod settings;
