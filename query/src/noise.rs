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
//! `exec.rs`) plus discrete Gaussian noise whose variance is an exact fraction [`Variance`]
//! (from the release's [`Sensitivity`], its number of statistics and ε in thousandths,
//! [`Epsilon`]). The samplers are those of Canonne, Kamath and Steinke ("The Discrete
//! Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1 to 3), the ones OpenDP
//! uses: Bernoulli(exp(-n/d)) from uniform integers only, discrete Laplace from those, and
//! discrete Gaussian by rejection from discrete Laplace, with big integers where the
//! fractions outgrow 128 bits. So there are no low bits of a floating-point draw to attack
//! (Mironov, CCS 2012) and no scale that underflows to "no noise". Uniform integers are drawn
//! by rejection from the ChaCha20 stream (exactly uniform). OpenDP's own samplers read the
//! operating system's randomness and cannot be keyed, and keyed noise is what makes a
//! repeated question (or the other side of an overlap) get the same numbers; so the ~80 lines
//! of the algorithms live here, with the statistical tests OpenDP and Google's library run on
//! theirs.
//!
//! **Accounting: zero-concentrated DP.** A release of sensitivity Δ₂ (L2, over all its
//! statistics) with discrete Gaussian noise of variance σ² is ρ-zCDP with ρ = Δ₂²/(2σ²)
//! (CKS Theorem 4). escrow sets σ = Δ₂/ε, so a question "at ε" costs ρ = ε²/2, and questions
//! compose by adding ρ: k questions at ε cost ρ = kε²/2, the cost of one question at ε√k. A
//! budget B is the ε of that one equivalent question: the ε of the questions asked add up in
//! squares, √(Σε²) ≤ B (see the ledger, `escrow::catalog`). Gaussian noise is what makes ten
//! useful questions fit a budget that still protects one company: with Laplace noise, ε adds
//! up linearly. (Questions answered with discrete Laplace noise before are ε-DP, hence
//! ε²/2-zCDP too, so the ledger composes them the same way.)

use hmac::{Hmac, Mac};
use num_bigint::BigUint;
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

/// How much one company can change a release, in grid units: `l1` in all (the sum of the
/// changes over every statistic it moves) and `linf` at most in any one statistic. The L2
/// sensitivity is at most `√(l1 · linf)`; for a count over `L` groups that is `√L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sensitivity {
    pub l1: u64,
    pub linf: u64,
}

impl Sensitivity {
    /// A company in at most `groups` groups, moving each by at most `per_group`.
    pub fn groups(groups: u64, per_group: u64) -> Sensitivity {
        let per_group = per_group.max(1);
        Sensitivity {
            // Saturating: an overflow could only make the noise larger.
            l1: groups.max(1).saturating_mul(per_group),
            linf: per_group,
        }
    }
}

/// The variance σ² of discrete Gaussian noise as the exact fraction `num / den` (grid
/// units squared): `P(x) ∝ exp(-x² / (2σ²))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variance {
    num: u128,
    den: u128,
}

impl Variance {
    /// The variance that makes a release of sensitivity `sensitivity` per statistic family
    /// cost ρ = ε²/2 in all when the question releases `statistics` such families (each
    /// company moves all of them): ρ is split evenly, σ² = Δ₂² · statistics / ε², with
    /// Δ₂² bounded by `l1 · linf`.
    pub fn gaussian(sensitivity: Sensitivity, statistics: u64, epsilon: Epsilon) -> Variance {
        let milli = u128::from(epsilon.milli().max(1));
        // Saturating: an overflow (beyond any validated setting) could only add noise.
        Variance {
            num: u128::from(sensitivity.l1.max(1))
                .saturating_mul(u128::from(sensitivity.linf.max(1)))
                .saturating_mul(u128::from(statistics.max(1)))
                .saturating_mul(1_000_000),
            den: milli * milli,
        }
    }

    /// The standard deviation as a number (for reports and thresholds; never used to draw).
    pub fn sd(self) -> f64 {
        (self.num as f64 / self.den as f64).sqrt()
    }
}

/// The scale of discrete Laplace noise as the exact fraction `num / den` (in units of the
/// statistic's grid): `P(x) ∝ exp(-|x| · den / num)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scale {
    num: u128,
    den: u128,
}

impl Scale {
    /// The scale as a number (for tests; never used to draw).
    #[cfg(test)]
    fn as_f64(self) -> f64 {
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
fn sample_discrete_laplace<R: Rng>(rng: &mut R, scale: Scale) -> i64 {
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

/// Uniform on `0..n`, `n > 0`, exactly, for big `n`: as many random bits as `n` has,
/// rejected when not below `n` (fewer than two draws on average).
fn uniform_below_big<R: Rng>(rng: &mut R, n: &BigUint) -> BigUint {
    let bits = n.bits();
    let mut bytes = vec![0u8; bits.div_ceil(8) as usize];
    let spare = (bytes.len() as u64 * 8 - bits) as u32;
    loop {
        rng.fill(&mut bytes[..]);
        bytes[0] &= 0xff >> spare;
        let x = BigUint::from_bytes_be(&bytes);
        if &x < n {
            return x;
        }
    }
}

/// Bernoulli(exp(-n / d)) for any `n >= 0`, `d > 0` as big integers: exp(-1) once per whole
/// unit of n/d, then CKS Algorithm 1 for the rest (Bernoulli(rest / (d·k)) for k = 1, 2, ...
/// until one is 0; true when that k is odd).
fn bernoulli_exp_big<R: Rng>(rng: &mut R, n: &BigUint, d: &BigUint) -> bool {
    // More than 2^64 whole units would take exp(-1) to pass 2^64 times: probability
    // below e^(-2^64), so stopping the count there changes nothing that can happen.
    let whole = u64::try_from(n / d).unwrap_or(u64::MAX);
    for _ in 0..whole {
        if !bernoulli_exp_upto_one(rng, 1, 1) {
            return false;
        }
    }
    let rest = n % d;
    let mut k = BigUint::from(1u8);
    while uniform_below_big(rng, &(d * &k)) < rest {
        k += 1u8;
    }
    k.bit(0)
}

/// One draw of discrete Gaussian noise of variance `v` (CKS Algorithm 3): with
/// `t = floor(σ) + 1`, draw `Y` from discrete Laplace of scale `t` and keep it with
/// probability `exp(-(|Y| - σ²/t)² / (2σ²))`. With σ² = n/d that exponent is the exact
/// fraction `(|Y|·d·t - n)² / (2·n·d·t²)`.
fn sample_discrete_gaussian<R: Rng>(rng: &mut R, v: Variance) -> i64 {
    let (n, d) = (v.num, v.den);
    // floor(√(n/d)) = floor(√floor(n/d)).
    let t = (n / d).isqrt() + 1;
    let laplace = Scale { num: t, den: 1 };
    let (n_big, d_big, t_big) = (BigUint::from(n), BigUint::from(d), BigUint::from(t));
    let den = BigUint::from(2u8) * &n_big * &d_big * &t_big * &t_big;
    loop {
        let y = sample_discrete_laplace(rng, laplace);
        let ydt = BigUint::from(y.unsigned_abs()) * &d_big * &t_big;
        let diff = if ydt >= n_big {
            ydt - &n_big
        } else {
            &n_big - ydt
        };
        if bernoulli_exp_big(rng, &(&diff * &diff), &den) {
            return y;
        }
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

    /// Discrete Gaussian noise of variance `variance` (in grid units) for statistic
    /// `statistic` of `group`.
    pub fn discrete_gaussian(&self, group: &[u8], statistic: u32, variance: Variance) -> i64 {
        sample_discrete_gaussian(&mut self.rng(group, statistic), variance)
    }
}

/// The noise a group's count must clear to be released when the group's existence depends
/// on data (partition selection): `linf + σ·√(2 ln(l1 / δ))` for a count of `sensitivity`
/// with noise of variance `v`. One company creates at most `l1` groups (each has a count of
/// at least 1), each with a count of at most `linf`; discrete Gaussian noise is
/// σ-subgaussian (CKS), so it reaches `m` with probability at most `exp(-m² / (2σ²))`, and
/// each such group is released with probability at most δ / l1: all of them together at
/// most δ.
pub fn partition_threshold(v: Variance, sensitivity: Sensitivity, delta: f64) -> f64 {
    let groups = sensitivity.l1.max(1) as f64;
    sensitivity.linf as f64 + v.sd() * (2.0 * (groups / delta).ln()).sqrt()
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
        let v = Variance::gaussian(Sensitivity::groups(1, 1), 1, eps(0.5));
        let draw = |fp| -> Vec<i64> {
            (0..50)
                .map(|i| noise(fp).discrete_gaussian(b"g", i, v))
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
    fn laplace_pmf(b: f64) -> impl Fn(i64) -> f64 {
        let a = (-1.0 / b).exp();
        move |x| (1.0 - a) / (1.0 + a) * a.powi(x.unsigned_abs() as i32)
    }

    /// P(x) of the discrete Gaussian with variance s2: exp(-x²/2s2) over its sum on Z.
    fn gaussian_pmf(s2: f64) -> impl Fn(i64) -> f64 {
        let reach = (40.0 * s2.sqrt()) as i64 + 40;
        let z: f64 = (-reach..=reach)
            .map(|x| (-((x * x) as f64) / (2.0 * s2)).exp())
            .sum();
        move |x| (-((x as f64).powi(2)) / (2.0 * s2)).exp() / z
    }

    /// Chi-square goodness of fit of `n` draws against an exact symmetric pmf (standard
    /// deviation `sd`), bins with at least 20 expected draws (tails merged), at significance
    /// about 1e-6 (Wilson-Hilferty): a correct sampler fails this with probability 1e-6, and
    /// the seeds are fixed. Also checks the mean against 0.
    fn fit(
        pmf: impl Fn(i64) -> f64,
        sd: f64,
        n: usize,
        mut draw: impl FnMut() -> i64,
    ) -> Result<(), String> {
        let mut k = 0i64;
        while pmf(k + 1) * n as f64 >= 20.0 {
            k += 1;
        }
        let mut counts = vec![0u64; (2 * k + 3) as usize];
        let mut sum = 0f64;
        for _ in 0..n {
            let x = draw();
            sum += x as f64;
            counts[(x.clamp(-k - 1, k + 1) + k + 1) as usize] += 1;
        }
        let tail: f64 = 1.0 - (-k..=k).map(&pmf).sum::<f64>();
        let mut chi2 = 0.0;
        for (i, &c) in counts.iter().enumerate() {
            let x = i as i64 - k - 1;
            let p = if x.abs() > k { tail / 2.0 } else { pmf(x) };
            let e = p * n as f64;
            chi2 += (c as f64 - e).powi(2) / e;
        }
        let df = (counts.len() - 1) as f64;
        let z = 4.75;
        let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
        if chi2 >= critical {
            return Err(format!(
                "sd {sd}: chi2 {chi2:.1} >= {critical:.1} (df {df}); counts {counts:?}"
            ));
        }
        let mean = sum / n as f64;
        if mean.abs() >= 5.0 * sd / (n as f64).sqrt() {
            return Err(format!("sd {sd}: mean {mean}"));
        }
        Ok(())
    }

    fn fit_laplace(claimed: Scale, n: usize, draw: impl FnMut() -> i64) -> Result<(), String> {
        let b = claimed.as_f64();
        let a = (-1.0 / b).exp();
        fit(laplace_pmf(b), (2.0 * a).sqrt() / (1.0 - a), n, draw)
    }

    fn fit_gaussian(s2: f64, n: usize, draw: impl FnMut() -> i64) -> Result<(), String> {
        fit(gaussian_pmf(s2), s2.sqrt(), n, draw)
    }

    fn laplace_draws(scale: Scale, seed: u8) -> impl FnMut() -> i64 {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        move || sample_discrete_laplace(&mut rng, scale)
    }

    fn gaussian_draws(v: Variance, seed: u8) -> impl FnMut() -> i64 {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        move || sample_discrete_gaussian(&mut rng, v)
    }

    fn as_f64(v: Variance) -> f64 {
        v.num as f64 / v.den as f64
    }

    #[test]
    fn discrete_laplace_follows_its_exact_distribution() {
        // Scales below one, around one, fractional and large; each a fraction t/s.
        for (i, scale) in [
            Scale { num: 1, den: 3 },
            Scale { num: 3, den: 2 },
            Scale { num: 1, den: 1 },
            Scale {
                num: 12_000,
                den: 700,
            },
            Scale { num: 250, den: 1 },
        ]
        .into_iter()
        .enumerate()
        {
            fit_laplace(scale, 200_000, laplace_draws(scale, i as u8)).unwrap();
        }
    }

    #[test]
    fn discrete_gaussian_follows_its_exact_distribution() {
        // σ below one, around one, the default count noise (σ = 8), fractional, large.
        for (i, v) in [
            Variance { num: 1, den: 5 },
            Variance { num: 1, den: 1 },
            Variance::gaussian(Sensitivity::groups(1, 1), 1, eps(0.125)),
            Variance::gaussian(Sensitivity::groups(3, 1), 2, eps(0.7)),
            Variance {
                num: 250_000,
                den: 3,
            },
        ]
        .into_iter()
        .enumerate()
        {
            fit_gaussian(as_f64(v), 200_000, gaussian_draws(v, 20 + i as u8)).unwrap();
        }
        // Through the keyed streams too: one draw per group, as answers draw.
        let v = Variance::gaussian(Sensitivity::groups(1, 1), 2, eps(1.0));
        let mut i = 0u64;
        fit_gaussian(as_f64(v), 50_000, || {
            i += 1;
            noise(3).discrete_gaussian(&i.to_be_bytes(), 0, v)
        })
        .unwrap();
    }

    #[test]
    fn the_fit_tells_a_wrong_scale() {
        // The check can fail: draws of scale 2 are not of scale 1.8, nor 2.2; draws of
        // variance 9 are not of variance 8.1 nor 9.9.
        let two = Scale { num: 2, den: 1 };
        assert!(fit_laplace(Scale { num: 9, den: 5 }, 200_000, laplace_draws(two, 7)).is_err());
        assert!(fit_laplace(Scale { num: 11, den: 5 }, 200_000, laplace_draws(two, 8)).is_err());
        assert!(fit_laplace(two, 200_000, laplace_draws(two, 9)).is_ok());
        let nine = Variance { num: 9, den: 1 };
        assert!(fit_gaussian(8.1, 200_000, gaussian_draws(nine, 7)).is_err());
        assert!(fit_gaussian(9.9, 200_000, gaussian_draws(nine, 8)).is_err());
        assert!(fit_gaussian(9.0, 200_000, gaussian_draws(nine, 9)).is_ok());
    }

    #[test]
    fn bernoulli_exp_has_probability_exp_minus_gamma() {
        let mut rng = ChaCha20Rng::from_seed([11; 32]);
        let n = 200_000;
        for (num, den) in [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 3)] {
            let big = (BigUint::from(num), BigUint::from(den));
            for use_big in [false, true] {
                let hits = (0..n)
                    .filter(|_| {
                        if use_big {
                            bernoulli_exp_big(&mut rng, &big.0, &big.1)
                        } else {
                            bernoulli_exp(&mut rng, num, den)
                        }
                    })
                    .count() as f64;
                let p = (-(num as f64) / den as f64).exp();
                let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
                assert!(
                    (hits / n as f64 - p).abs() <= 5.0 * sd,
                    "exp(-{num}/{den}) (big: {use_big}): {} vs {p}",
                    hits / n as f64
                );
            }
        }
    }

    #[test]
    fn big_uniforms_are_uniform() {
        // 3 buckets of 0..3·2^70: each about a third (a wrong bit mask would skew them).
        let mut rng = ChaCha20Rng::from_seed([13; 32]);
        let n = BigUint::from(3u8) << 70;
        let third = BigUint::from(1u8) << 70;
        let mut buckets = [0u32; 3];
        for _ in 0..30_000 {
            let x = uniform_below_big(&mut rng, &n);
            assert!(x < n);
            buckets[u64::try_from(x / &third).unwrap() as usize] += 1;
        }
        assert!(
            buckets.iter().all(|b| b.abs_diff(10_000) < 400),
            "{buckets:?}"
        );
    }

    #[test]
    fn huge_and_tiny_variances_stay_exact() {
        // No variance underflows to "no noise" and none overflows: a sum's grid noise at the
        // smallest ε, with the largest L and many statistics, is about 5e10 grid units; the
        // largest ε still draws integers.
        let mut rng = ChaCha20Rng::from_seed([12; 32]);
        let big = Variance::gaussian(Sensitivity::groups(100, 1 << 20), 20, eps(0.001));
        let xs: Vec<i64> = (0..2000)
            .map(|_| sample_discrete_gaussian(&mut rng, big))
            .collect();
        let sd = (xs.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / 2000.0).sqrt();
        assert!((sd / big.sd() - 1.0).abs() < 0.1, "{sd} vs {}", big.sd());
        let small = Variance::gaussian(Sensitivity::groups(1, 1), 1, eps(100.0));
        assert!((0..1000).all(|_| sample_discrete_gaussian(&mut rng, small).abs() <= 1));
    }

    #[test]
    fn partition_threshold_bounds_the_tail() {
        // Whatever σ and sensitivity: l1 groups of count linf, each released with the exact
        // discrete Gaussian tail past the threshold, together at most δ.
        for (s, e) in [
            (Sensitivity::groups(1, 1), 0.125),
            (Sensitivity::groups(1, 1), 100.0),
            (Sensitivity::groups(3, 1), 0.1),
            (Sensitivity { l1: 8, linf: 4 }, 0.5),
        ] {
            let v = Variance::gaussian(s, 1, eps(e));
            let t = partition_threshold(v, s, 1e-6);
            let pmf = gaussian_pmf(as_f64(v));
            let reach = (t as i64) + (60.0 * v.sd()) as i64 + 60;
            let from = (t - s.linf as f64).ceil() as i64;
            let tail: f64 = (from..=reach).map(&pmf).sum::<f64>() * s.l1 as f64;
            assert!(tail <= 1e-6, "{s:?} eps {e}: {tail}");
        }
        let one = Sensitivity::groups(1, 1);
        let v = |e| Variance::gaussian(one, 1, eps(e));
        assert!(partition_threshold(v(2.0), one, 1e-6) < partition_threshold(v(1.0), one, 1e-6));
        let three = Sensitivity::groups(3, 1);
        assert!(
            partition_threshold(Variance::gaussian(three, 1, eps(1.0)), three, 1e-6)
                > partition_threshold(v(1.0), one, 1e-6)
        );
    }
}
