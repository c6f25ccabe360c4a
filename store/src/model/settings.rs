//! Owners' protection settings per dataset, as values: the threshold k, ε per query, the
//! privacy budget per querying partner, contribution bounding, and clamping bounds for
//! SUM/AVG metrics, with their defaults (docs/API.md, docs/THREAT_MODEL.md) and the checks a
//! change must pass whole (`crate::settings` applies a change through the store).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const DEFAULT_MIN_ENTITIES: u64 = 5;
/// Ten questions at ε = 0.125 cost √10 · 0.125 = 0.395 of the default budget 0.4, which
/// holds any guess about one company to at most 60% right ([`guarantee`]).
pub const DEFAULT_EPSILON: f64 = 0.125;
pub const DEFAULT_BUDGET: f64 = 0.4;
pub const DEFAULT_MAX_GROUPS: u32 = 1;

/// Protection settings of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSettings {
    /// Minimum distinct entities of this dataset in any released row (k).
    pub min_entities: u64,
    /// Privacy loss per query that reads this dataset (ρ = ε²/2 in zCDP).
    pub epsilon: f64,
    /// What each other partner may spend on the owner's data, as the ε of one equivalent
    /// question: the ε of its questions add up in squares (`√(Σ ε²) <= budget`).
    pub budget: f64,
    /// Groups one entity may contribute to in one query (L).
    pub max_groups_per_entity: u32,
    /// Clamping bounds `[low, high]` per numeric column, required before a partner's query
    /// may SUM or AVG it.
    #[serde(default)]
    pub bounds: BTreeMap<String, [f64; 2]>,
}

impl Default for DatasetSettings {
    fn default() -> Self {
        DatasetSettings {
            min_entities: DEFAULT_MIN_ENTITIES,
            epsilon: DEFAULT_EPSILON,
            budget: DEFAULT_BUDGET,
            max_groups_per_entity: DEFAULT_MAX_GROUPS,
            bounds: BTreeMap::new(),
        }
    }
}

/// A change requested by the owner; absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsChange {
    pub dataset: String,
    pub min_entities: Option<u64>,
    pub epsilon: Option<f64>,
    pub budget: Option<f64>,
    pub max_groups_per_entity: Option<u32>,
    /// Bounds to set; `null` for a column removes its bounds.
    #[serde(default)]
    pub bounds: BTreeMap<String, Option<[f64; 2]>>,
}

pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::invalid_field("invalid_setting", field, message)
}

impl DatasetSettings {
    pub fn validate(&self, numeric_columns: &[String]) -> Result<()> {
        if !(2..=1_000_000).contains(&self.min_entities) {
            return Err(invalid(
                "min_entities",
                "min_entities must be between 2 and 1000000",
            ));
        }
        if escrow_query::Epsilon::from_f64(self.epsilon).is_none() {
            return Err(invalid(
                "epsilon",
                "epsilon must be a multiple of 0.001 between 0.001 and 100",
            ));
        }
        if !(self.budget.is_finite() && self.budget >= 0.0 && self.budget <= 1e6) {
            return Err(invalid("budget", "budget must be between 0 and 1000000"));
        }
        if !(1..=100).contains(&self.max_groups_per_entity) {
            return Err(invalid(
                "max_groups_per_entity",
                "max_groups_per_entity must be between 1 and 100",
            ));
        }
        for (col, [lo, hi]) in &self.bounds {
            if !numeric_columns.contains(col) {
                return Err(invalid(
                    format!("bounds.{col}"),
                    format!("bounds need a numeric column of the dataset; {col:?} is not one"),
                ));
            }
            check_bounds(col, *lo, *hi)?;
        }
        Ok(())
    }
}

/// Largest magnitude a clamping bound may have (beyond it, per-entity sums of float64
/// values lose whole units).
pub const MAX_BOUND: f64 = 1e15;
/// Smallest largest-magnitude of a pair of bounds: below it the bounds are not a metric's
/// range but a way to make every value the same.
pub const MIN_BOUND: f64 = 1e-6;

/// Bounds `[lo, hi]` of a metric: finite numbers, each 0 or normal (no sub-normals), at most
/// [`MAX_BOUND`] in magnitude, the larger magnitude at least [`MIN_BOUND`], and `hi - lo` at
/// least one grid step of the sum grid (`escrow_query::exec::grid_step`). The noise of a sum
/// is drawn in grid units, so no pair of bounds can shrink it below one entity's largest
/// contribution; these checks refuse bounds that are a mistake or an attempt.
fn check_bounds(col: &str, lo: f64, hi: f64) -> Result<()> {
    let normal_or_zero = |x: f64| x == 0.0 || x.is_normal();
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(invalid(
            format!("bounds.{col}"),
            format!("bounds of {col} must be finite numbers"),
        ));
    }
    if !(normal_or_zero(lo) && normal_or_zero(hi)) {
        return Err(invalid(
            format!("bounds.{col}"),
            format!("bounds of {col} must be 0 or normal numbers (not sub-normal)"),
        ));
    }
    if lo.abs() > MAX_BOUND || hi.abs() > MAX_BOUND {
        return Err(invalid(
            format!("bounds.{col}"),
            format!("bounds of {col} must be within -{MAX_BOUND:e}..{MAX_BOUND:e}"),
        ));
    }
    if lo.abs().max(hi.abs()) < MIN_BOUND {
        return Err(invalid(
            format!("bounds.{col}"),
            format!("bounds of {col}: the larger magnitude must be at least {MIN_BOUND:e}"),
        ));
    }
    if lo >= hi || hi - lo < escrow_query::exec::grid_step(lo, hi) {
        return Err(invalid(
            format!("bounds.{col}"),
            format!(
                "bounds of {col} must have low < high, at least one millionth of their range apart"
            ),
        ));
    }
    Ok(())
}

/// What a budget protects, in plain words (docs/THREAT_MODEL.md, "The guarantee, in plain
/// words"). A partner's questions on one owner cost ρ = B²/2 in all at most (zCDP, see the
/// ledger), up to δ per question for the groups whose existence depends on data. ρ-zCDP
/// bounds the KL divergence between what the partner sees with and without one company by
/// ρ, so by Pinsker's inequality the total variation distance by √(ρ/2) = B/2, and any guess
/// of "in or out" from a 50/50 start is right with probability at most 1/2 + B/4.
pub fn guarantee(budget: f64, epsilon: f64, delta: f64) -> String {
    let right = (50.0 + 25.0 * budget).min(100.0);
    let right = if right > 99.9 {
        format!("{right:.3}")
    } else {
        format!("{right:.1}")
    };
    let questions = ((budget / epsilon).powi(2) + 1e-9).floor();
    format!(
        "a partner that spends its whole budget on your data ({budget} in all: {questions} questions at epsilon {epsilon}, whose epsilons add up in squares) can guess whether one given company is in your list right at most {right}% of the time, where a coin toss is right 50% of the time (except with probability about {delta:e} per question)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(epsilon: f64, bounds: Option<[f64; 2]>) -> DatasetSettings {
        DatasetSettings {
            epsilon,
            bounds: bounds.into_iter().map(|b| ("arr".to_string(), b)).collect(),
            ..DatasetSettings::default()
        }
    }

    #[test]
    fn the_guarantee_sentence_has_the_current_numbers() {
        // The defaults: ten questions, at most 60% right.
        let g = guarantee(DEFAULT_BUDGET, DEFAULT_EPSILON, 1e-6);
        assert!(g.contains("right at most 60.0% of the time"), "{g}");
        assert!(
            g.contains("(0.4 in all: 10 questions at epsilon 0.125"),
            "{g}"
        );
        // ε add up in squares: budget 1 holds 100 questions at 0.1; 1/2 + B/4 = 75%.
        let g = guarantee(1.0, 0.1, 1e-6);
        assert!(g.contains("right at most 75.0% of the time"), "{g}");
        assert!(g.contains("100 questions at epsilon 0.1"), "{g}");
        assert!(guarantee(10.0, 1.0, 1e-6).contains("at most 100.000% of the time"));
        assert!(guarantee(0.0, 1.0, 1e-6).contains("at most 50.0% of the time"));
    }

    #[test]
    fn privacy_parameters_are_checked() {
        let numeric = vec!["arr".to_string()];
        let ok = |s: DatasetSettings| s.validate(&numeric).is_ok();
        assert!(ok(with(1.0, Some([0.0, 500.0]))));
        assert!(ok(with(0.001, Some([-1e15, 1e15]))));
        assert!(ok(with(100.0, Some([-1e-6, 0.0]))));
        assert!(ok(with(0.25, Some([1.0, 1.000001]))));
        let sub = f64::MIN_POSITIVE / 4.0;
        for bounds in [
            [0.0, sub],               // sub-normal: the side door of floating-point Laplace
            [-sub, sub],              //
            [sub, 10.0],              // one sub-normal bound
            [0.0, 1e-300],            // normal but tiny: no range at all
            [0.0, f64::INFINITY],     //
            [f64::NEG_INFINITY, 0.0], //
            [f64::NAN, 1.0],          //
            [0.0, f64::NAN],          //
            [5.0, 5.0],               // zero width
            [6.0, 5.0],               // reversed
            [1.0, 1.0 + 1e-12],       // narrower than one grid step
            [0.0, 1e16],              // huge
            [-1e300, 0.0],            //
        ] {
            assert!(!ok(with(1.0, Some(bounds))), "{bounds:?}");
        }
        for epsilon in [
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            sub,
            1e-300,
            0.0004,
            0.0105,
            100.5,
            1e9,
        ] {
            assert!(!ok(with(epsilon, None)), "{epsilon}");
        }
        let mut s = with(1.0, None);
        s.budget = f64::NAN;
        assert!(!ok(s.clone()));
        s.budget = f64::INFINITY;
        assert!(!ok(s.clone()));
        s.budget = -0.5;
        assert!(!ok(s));
    }
}
