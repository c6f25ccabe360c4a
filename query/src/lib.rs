//! escrow-query: the clean-room query engine. SQL -> DataFusion LogicalPlan -> gate
//! (allow-list) -> rewrite (threshold, noise) -> execution over decrypting table providers.
//! Knows nothing of HTTP; takes a policy decision function, not casbin itself.
//!
//! Empty shell for now: the approved-queries issue fills it.
