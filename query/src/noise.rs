//! Differential-privacy noise, deterministic per question.
//!
//! Every noisy statistic draws from its own ChaCha20 stream seeded by
//! `HMAC-SHA256(noise key, "escrow-noise-v1" ‖ query fingerprint ‖ group ‖ statistic)`.
//! The noise key is a secret of the escrow (without it, noise could be predicted and
//! subtracted); the fingerprint covers the plan, the data versions and the protection
//! settings. The same question on the same data therefore gets the same answer (asking again
//! averages nothing away), while any change of question or data draws fresh noise.
//!
//! Counts get discrete Laplace noise (two-sided geometric, the difference of two geometric
//! draws), so released counts are integers with no floating-point low bits to attack. Sums
//! get continuous Laplace noise (difference of two exponentials) over clamped values.

use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Exp, Geometric};
use sha2::Sha256;

/// The escrow's secret noise key (32 random bytes, kept in the data directory).
#[derive(Clone)]
pub struct NoiseKey([u8; 32]);

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(..)")
    }
}

impl NoiseKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        NoiseKey(bytes)
    }

    /// The entity-id hasher, under a key derived from this one (domain-separated, so ids
    /// and noise never share key material).
    pub fn entity_hasher(&self) -> crate::EntityHasher {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"escrow-entity-id-v1\0");
        let mut derived: [u8; 32] = mac.finalize().into_bytes().into();
        let mut key = [0u8; 16];
        key.copy_from_slice(&derived[..16]);
        zeroize::Zeroize::zeroize(&mut derived);
        let hasher = crate::EntityHasher::new(key);
        zeroize::Zeroize::zeroize(&mut key);
        hasher
    }
}

impl Drop for NoiseKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The noise source of one question.
#[derive(Debug, Clone)]
pub struct Noise {
    key: NoiseKey,
    fingerprint: [u8; 32],
}

impl Noise {
    pub fn new(key: NoiseKey, fingerprint: [u8; 32]) -> Self {
        Noise { key, fingerprint }
    }

    fn rng(&self, group: &[u8], statistic: u32) -> ChaCha20Rng {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"escrow-noise-v1\0");
        mac.update(&self.fingerprint);
        mac.update(&(group.len() as u64).to_be_bytes());
        mac.update(group);
        mac.update(&statistic.to_be_bytes());
        let seed: [u8; 32] = mac.finalize().into_bytes().into();
        ChaCha20Rng::from_seed(seed)
    }

    /// Discrete Laplace noise with scale `scale` (= sensitivity / ε).
    pub fn discrete_laplace(&self, group: &[u8], statistic: u32, scale: f64) -> i64 {
        let p = 1.0 - (-1.0 / scale).exp();
        let Ok(geo) = Geometric::new(p) else {
            return 0; // p == 1 (scale ~ 0): no noise representable, only for huge ε
        };
        let mut rng = self.rng(group, statistic);
        let a = geo.sample(&mut rng).min(i64::MAX as u64) as i64;
        let b = geo.sample(&mut rng).min(i64::MAX as u64) as i64;
        a.saturating_sub(b)
    }

    /// Continuous Laplace noise with scale `scale` (= sensitivity / ε).
    pub fn laplace(&self, group: &[u8], statistic: u32, scale: f64) -> f64 {
        if scale <= 0.0 {
            return 0.0;
        }
        let Ok(exp) = Exp::new(1.0 / scale) else {
            return 0.0;
        };
        let mut rng = self.rng(group, statistic);
        exp.sample(&mut rng) - exp.sample(&mut rng)
    }
}

/// The count a group must reach (noisy) to be released when its existence depends on data:
/// Laplace partition selection, `1 + (L/ε)·ln(L / 2δ)` for entities that each contribute to
/// at most `L` groups. Below it, a group made of one entity would appear with probability
/// above δ.
pub fn partition_threshold(epsilon: f64, max_groups: u32, delta: f64) -> f64 {
    let l = f64::from(max_groups.max(1));
    1.0 + (l / epsilon) * (l / (2.0 * delta)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(fp: u8) -> Noise {
        Noise::new(NoiseKey::new([7; 32]), [fp; 32])
    }

    #[test]
    fn same_question_same_noise_other_question_other_noise() {
        let a: Vec<i64> = (0..50)
            .map(|i| noise(1).discrete_laplace(b"g", i, 2.0))
            .collect();
        let b: Vec<i64> = (0..50)
            .map(|i| noise(1).discrete_laplace(b"g", i, 2.0))
            .collect();
        let c: Vec<i64> = (0..50)
            .map(|i| noise(2).discrete_laplace(b"g", i, 2.0))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn discrete_laplace_has_the_calibrated_spread() {
        // Var of discrete Laplace with parameter a = exp(-1/scale) is 2a / (1-a)^2.
        let scale = 3.0;
        let n = 20_000;
        let xs: Vec<f64> = (0..n)
            .map(|i| noise(3).discrete_laplace(&(i as u64).to_be_bytes(), 0, scale) as f64)
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let a = (-1.0f64 / scale).exp();
        let expected = 2.0 * a / (1.0 - a).powi(2);
        assert!(mean.abs() < 0.15, "mean {mean}");
        assert!(
            (var / expected - 1.0).abs() < 0.08,
            "var {var} vs {expected}"
        );
        // Laplace sums: variance 2 b^2.
        let ys: Vec<f64> = (0..n)
            .map(|i| noise(4).laplace(&(i as u64).to_be_bytes(), 1, scale))
            .collect();
        let var = ys.iter().map(|y| y * y).sum::<f64>() / n as f64;
        assert!(((var / (2.0 * scale * scale)) - 1.0).abs() < 0.08, "{var}");
    }

    #[test]
    fn partition_threshold_matches_the_formula() {
        let t = partition_threshold(1.0, 1, 1e-6);
        assert!((t - (1.0 + (0.5e6f64).ln())).abs() < 1e-9);
        assert!(partition_threshold(2.0, 1, 1e-6) < t);
        assert!(partition_threshold(1.0, 2, 1e-6) > t);
    }
}
