//! Differential-privacy noise: exact samplers, deterministic per question.
//!
//! Every noisy statistic draws from its own ChaCha20 stream seeded by
//! `HMAC-SHA256(noise key, "escrow-noise-v1" ‖ query fingerprint ‖ group ‖ statistic)`.
//! The noise key is a secret of the escrow (without it, noise could be predicted and
//! subtracted); the fingerprint covers the plan, the data versions and the protection
//! settings. The same question on the same data therefore gets the same answer (asking again
//! averages nothing away), while any change of question or data draws fresh noise.
//!
//! **No floating point anywhere in a sample.** Every released statistic is an integer on a
//! grid (entity counts; sums in units of a grid step fixed by the owner's bounds, see
//! `exec.rs`) plus discrete Laplace noise whose scale is an exact fraction [`Scale`]
//! (sensitivity × statistics × 1000 / ε in thousandths, [`Epsilon`]). The sampler is the one
//! of Canonne, Kamath and Steinke ("The Discrete Gaussian for Differential Privacy", NeurIPS
//! 2020, Algorithms 1 and 2), the one OpenDP uses: Bernoulli(exp(-n/d)) from uniform integers
//! only, so there are no low bits of a floating-point draw to attack (Mironov, CCS 2012) and
//! no scale that underflows to "no noise". Uniform integers are drawn by rejection from
//! 128-bit words of the ChaCha20 stream (exactly uniform). OpenDP's own samplers read the operating
//! system's randomness and cannot be keyed, and keyed noise is what makes a repeated question
//! (or the other side of an overlap) get the same numbers; so the ~40 lines of the algorithm
//! live here, with the statistical tests OpenDP and Google's library run on theirs.

use hmac::{Hmac, Mac};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;

/// ε of a question, as an exact number of thousandths (owners' settings are validated to
/// be multiples of 0.001, so no rounding happens here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Epsilon(u64);

impl Epsilon {
    /// The grid of ε values: thousandths.
    pub const QUANTUM: f64 = 0.001;
    /// The largest ε one question may have.
    pub const MAX: f64 = 100.0;

    /// `epsilon` if it is a multiple of 0.001 in `[0.001, 100]`; `None` otherwise (NaN,
    /// infinite, zero, negative, sub-normal, off the grid, too large).
    pub fn from_f64(epsilon: f64) -> Option<Epsilon> {
        if !(Self::QUANTUM..=Self::MAX).contains(&epsilon) {
            return None;
        }
        let milli = (epsilon * 1000.0).round();
        ((milli / 1000.0 - epsilon).abs() <= 1e-12 * epsilon.max(1.0))
            .then_some(Epsilon(milli as u64))
    }

    /// The largest ε on the grid that is at most `epsilon` (at least 0.001, at most 100):
    /// for values stored before ε had a grid, rounded towards more protection. NaN gives
    /// the smallest.
    pub fn at_most(epsilon: f64) -> Epsilon {
        let milli = (epsilon * 1000.0 * (1.0 + 1e-12)).floor();
        Epsilon(if milli >= 1.0 {
            milli.min(Self::MAX * 1000.0) as u64
        } else {
            1
        })
    }

    /// ε in thousandths.
    pub fn milli(self) -> u64 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

/// The scale of discrete Laplace noise as the exact fraction `num / den` (in units of the
/// statistic's grid): `P(x) ∝ exp(-|x| · den / num)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    num: u128,
    den: u128,
}

impl Scale {
    /// The scale that makes one statistic of sensitivity `sensitivity` (grid units one
    /// entity can move it by) ε/`statistics`-differentially private: the question's ε is
    /// split evenly over its `statistics` noisy values (sequential composition).
    pub fn laplace(sensitivity: u64, statistics: u64, epsilon: Epsilon) -> Scale {
        Scale {
            num: u128::from(sensitivity.max(1)) * u128::from(statistics.max(1)) * 1000,
            den: u128::from(epsilon.milli().max(1)),
        }
    }

    /// The scale as a number (for reports; never used to draw).
    pub fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// Uniform on `0..n`, `n > 0`, exactly: a uniform 128-bit draw, rejected below
/// `2^128 mod n` so that what remains is a whole number of copies of `0..n`. (`rand`'s
/// `random_range` without its `unbiased` feature uses a method that is biased once in 2^128.)
fn uniform_below<R: Rng>(rng: &mut R, n: u128) -> u128 {
    let reject_below = n.wrapping_neg() % n;
    loop {
        let x: u128 = rng.random();
        if x >= reject_below {
            return x % n;
        }
    }
}

/// Bernoulli(n / d), `n <= d`, `d > 0`.
fn bernoulli_fraction<R: Rng>(rng: &mut R, n: u128, d: u128) -> bool {
    uniform_below(rng, d) < n
}

/// Bernoulli(exp(-n / d)) for `n <= d` (CKS Algorithm 1, γ in [0, 1]): draw
/// A_k ~ Bernoulli(γ / k) for k = 1, 2, ... until one is 0; the answer is whether that k is odd.
fn bernoulli_exp_upto_one<R: Rng>(rng: &mut R, n: u128, d: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli_fraction(rng, n, d * k) {
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(-n / d)) for any `n >= 0`, `d > 0`: exp(-1) once per whole unit of γ, then
/// the fractional rest.
#[cfg(test)]
fn bernoulli_exp<R: Rng>(rng: &mut R, n: u128, d: u128) -> bool {
    for _ in 0..n / d {
        if !bernoulli_exp_upto_one(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp_upto_one(rng, n % d, d)
}

/// One draw of discrete Laplace noise of scale `t / s` (CKS Algorithm 2): a geometric
/// magnitude built from U ~ Uniform{0..t-1} accepted with probability exp(-U/t) and
/// V ~ Geometric(1 - exp(-1)), then `floor((U + tV) / s)` with a fair sign, rejecting -0.
pub fn sample_discrete_laplace<R: Rng>(rng: &mut R, scale: Scale) -> i64 {
    let (t, s) = (scale.num, scale.den);
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp_upto_one(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_upto_one(rng, 1, 1) {
            v += 1;
        }
        let y = (u + t * v) / s;
        let negative: bool = rng.random();
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return if negative { -y } else { y };
    }
}

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

    /// Discrete Laplace noise of scale `scale` (in grid units) for statistic `statistic`
    /// of `group`.
    pub fn discrete_laplace(&self, group: &[u8], statistic: u32, scale: Scale) -> i64 {
        sample_discrete_laplace(&mut self.rng(group, statistic), scale)
    }
}

/// The count a group must reach (noisy) to be released when its existence depends on data:
/// `1 + b·ln(L / δ)` with `b = L/ε` the scale of the count's noise, for entities that each
/// contribute to at most `L` groups. Discrete Laplace noise of scale `b` reaches `m` with
/// probability `a^m / (1 + a) <= e^(-m/b)` (`a = e^(-1/b)`), so a group made of one entity is
/// released with probability at most δ/L per group it could appear in. (The continuous
/// Laplace bound, `ln(L / 2δ)`, is up to twice too loose for the discrete noise at small
/// scales; found by review.)
pub fn partition_threshold(epsilon: f64, max_groups: u32, delta: f64) -> f64 {
    let l = f64::from(max_groups.max(1));
    1.0 + (l / epsilon) * (l / delta).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(fp: u8) -> Noise {
        Noise::new(NoiseKey::new([7; 32]), [fp; 32])
    }

    fn eps(e: f64) -> Epsilon {
        Epsilon::from_f64(e).unwrap()
    }

    #[test]
    fn same_question_same_noise_other_question_other_noise() {
        let s = Scale::laplace(1, 1, eps(0.5));
        let draw = |fp| -> Vec<i64> {
            (0..50)
                .map(|i| noise(fp).discrete_laplace(b"g", i, s))
                .collect()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn epsilon_is_a_checked_multiple_of_a_thousandth() {
        assert_eq!(eps(1.0).milli(), 1000);
        assert_eq!(eps(0.001).milli(), 1);
        assert_eq!(eps(0.1).milli(), 100);
        assert_eq!(eps(100.0).milli(), 100_000);
        assert_eq!(Epsilon::at_most(1.0 / 3.0).milli(), 333);
        assert_eq!(Epsilon::at_most(0.7).milli(), 700);
        assert_eq!(Epsilon::at_most(f64::NAN).milli(), 1);
        assert_eq!(Epsilon::at_most(1e300).milli(), 100_000);
        for bad in [
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE / 2.0,
            0.0005,
            0.0015,
            100.001,
            1e300,
        ] {
            assert_eq!(Epsilon::from_f64(bad), None, "{bad}");
        }
    }

    /// P(x) of discrete Laplace with scale b: (1-a)/(1+a) · a^|x|, a = exp(-1/b).
    fn pmf(b: f64, x: i64) -> f64 {
        let a = (-1.0 / b).exp();
        (1.0 - a) / (1.0 + a) * a.powi(x.unsigned_abs() as i32)
    }

    /// Chi-square goodness of fit of `n` draws against the exact pmf of `claimed`, bins with
    /// at least 20 expected draws (tails merged), at significance about 1e-6
    /// (Wilson-Hilferty): a correct sampler fails this with probability 1e-6, and the seeds
    /// are fixed. Also checks the mean against 0.
    fn fit(claimed: Scale, n: usize, mut draw: impl FnMut() -> i64) -> Result<(), String> {
        let b = claimed.as_f64();
        let mut k = 0i64;
        while pmf(b, k + 1) * n as f64 >= 20.0 {
            k += 1;
        }
        let mut counts = vec![0u64; (2 * k + 3) as usize];
        let mut sum = 0f64;
        for _ in 0..n {
            let x = draw();
            sum += x as f64;
            counts[(x.clamp(-k - 1, k + 1) + k + 1) as usize] += 1;
        }
        let tail: f64 = 1.0 - (-k..=k).map(|x| pmf(b, x)).sum::<f64>();
        let mut chi2 = 0.0;
        for (i, &c) in counts.iter().enumerate() {
            let x = i as i64 - k - 1;
            let p = if x.abs() > k { tail / 2.0 } else { pmf(b, x) };
            let e = p * n as f64;
            chi2 += (c as f64 - e).powi(2) / e;
        }
        let df = (counts.len() - 1) as f64;
        let z = 4.75;
        let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
        if chi2 >= critical {
            return Err(format!(
                "scale {b}: chi2 {chi2:.1} >= {critical:.1} (df {df}); counts {counts:?}"
            ));
        }
        let mean = sum / n as f64;
        let a = (-1.0 / b).exp();
        let sd = (2.0 * a).sqrt() / (1.0 - a);
        if mean.abs() >= 5.0 * sd / (n as f64).sqrt() {
            return Err(format!("scale {b}: mean {mean}"));
        }
        Ok(())
    }

    fn draws(scale: Scale, seed: u8) -> impl FnMut() -> i64 {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        move || sample_discrete_laplace(&mut rng, scale)
    }

    #[test]
    fn discrete_laplace_follows_its_exact_distribution() {
        // Scales below one, around one, fractional and large; each a fraction t/s.
        for (i, scale) in [
            Scale { num: 1, den: 3 },
            Scale { num: 3, den: 2 },
            Scale::laplace(1, 1, eps(1.0)),
            Scale::laplace(4, 3, eps(0.7)),
            Scale { num: 250, den: 1 },
        ]
        .into_iter()
        .enumerate()
        {
            fit(scale, 200_000, draws(scale, i as u8)).unwrap();
        }
        // Through the keyed streams too: one draw per group, as answers draw.
        let s = Scale::laplace(1, 2, eps(1.0));
        let mut i = 0u64;
        fit(s, 50_000, || {
            i += 1;
            noise(3).discrete_laplace(&i.to_be_bytes(), 0, s)
        })
        .unwrap();
    }

    #[test]
    fn the_fit_tells_a_wrong_scale() {
        // The check can fail: draws of scale 2 are not of scale 1.8, nor 2.2.
        let two = Scale { num: 2, den: 1 };
        assert!(fit(Scale { num: 9, den: 5 }, 200_000, draws(two, 7)).is_err());
        assert!(fit(Scale { num: 11, den: 5 }, 200_000, draws(two, 8)).is_err());
        assert!(fit(two, 200_000, draws(two, 9)).is_ok());
    }

    #[test]
    fn bernoulli_exp_has_probability_exp_minus_gamma() {
        let mut rng = ChaCha20Rng::from_seed([11; 32]);
        let n = 200_000;
        for (num, den) in [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 3)] {
            let hits = (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            assert!(
                (hits / n as f64 - p).abs() <= 5.0 * sd,
                "exp(-{num}/{den}): {} vs {p}",
                hits / n as f64
            );
        }
    }

    #[test]
    fn huge_and_tiny_scales_stay_exact() {
        // No scale underflows to "no noise" and none overflows: a sum's grid noise at the
        // smallest ε is about 1e11 grid units; the largest ε still draws integers.
        let mut rng = ChaCha20Rng::from_seed([12; 32]);
        let big = Scale::laplace(100 << 20, 20, eps(0.001));
        let xs: Vec<i64> = (0..2000)
            .map(|_| sample_discrete_laplace(&mut rng, big))
            .collect();
        let mean_abs = xs.iter().map(|x| x.unsigned_abs() as f64).sum::<f64>() / 2000.0;
        assert!((mean_abs / big.as_f64() - 1.0).abs() < 0.1, "{mean_abs}");
        let small = Scale::laplace(1, 1, eps(100.0));
        assert!((0..1000).all(|_| sample_discrete_laplace(&mut rng, small).abs() <= 1));
    }

    #[test]
    fn partition_threshold_matches_the_formula() {
        let t = partition_threshold(1.0, 1, 1e-6);
        assert!((t - (1.0 + (1e6f64).ln())).abs() < 1e-9);
        // The discrete tail at the threshold is at most δ: a^m / (1 + a) with m = t - 1.
        for (eps, l) in [(1.0, 1u32), (100.0, 1), (0.1, 3), (50.0, 4)] {
            let b = f64::from(l) / eps;
            let a = (-1.0 / b).exp();
            let m = (partition_threshold(eps, l, 1e-6) - 1.0).ceil();
            let tail = a.powf(m) / (1.0 + a) * f64::from(l);
            assert!(tail <= 1e-6 * (1.0 + 1e-9), "eps {eps} L {l}: {tail}");
        }
        assert!(partition_threshold(2.0, 1, 1e-6) < t);
        assert!(partition_threshold(1.0, 2, 1e-6) > t);
    }
}
