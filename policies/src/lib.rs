//! escrow-policies: the casbin model and the library that loads, validates, versions and
//! evaluates data owners' policies ("may partner P use column C of dataset D as a join
//! key?"). No HTTP here.
//!
//! Empty shell for now: the approved-queries issue fills it.
