//! The statistics of task evaluation: the Wilson interval of an accuracy, and a model paired
//! against a reference on the same docs (answer agreement, the accuracy difference with its
//! paired bootstrap interval, the KL divergence between the two models' choice distributions).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{argmax, DocScore, ReferenceAccuracy, TaskEvalError};

/// z of a two-sided 95% normal interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Resamples of the paired bootstrap for the accuracy difference.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Seed of the bootstrap, fixed so that a report reproduces.
pub const BOOTSTRAP_SEED: u64 = 0x0005_eed0_f0e7;

/// The 95% Wilson score interval of a binomial proportion `successes / n` (`[0, 1]` for `n` 0).
pub fn wilson_ci95(successes: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (n, p) = (n as f64, successes as f64 / n as f64);
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    [(center - half).max(0.0), (center + half).min(1.0)]
}

/// Paired figures of a model against a reference on the same docs.
#[derive(Debug, Clone, Serialize)]
pub struct PairedFigures {
    /// The reference's accuracy on the docs.
    pub reference: ReferenceAccuracy,
    /// Fraction of docs where both models pick the same choice (highest log-likelihood).
    pub agreement: f64,
    /// The model's accuracy minus the reference's.
    pub accuracy_diff: f64,
    /// 95% paired bootstrap interval of `accuracy_diff` (as
    /// [`TaskReport::accuracy_diff_ci95`](super::TaskReport::accuracy_diff_ci95)).
    pub accuracy_diff_ci95: [f64; 2],
    /// Mean over docs of KL(reference || model) of the choice distributions, in nats.
    pub choice_kl_mean: f64,
}

/// Pairs a model's doc scores with a reference's scored separately on the same docs (a cached
/// evaluation of the original, say), as [`evaluate`](super::evaluate) with a reference pairs
/// them: fills in each doc's reference fields and returns the paired figures. Fails unless both
/// list the same docs in the same order.
pub fn pair_with_reference(
    docs: &mut [DocScore],
    reference: &[DocScore],
) -> Result<PairedFigures, TaskEvalError> {
    let same = docs.len() == reference.len()
        && docs
            .iter()
            .zip(reference)
            .all(|(d, r)| d.doc_id == r.doc_id && d.loglikelihoods.len() == r.loglikelihoods.len());
    if !same {
        return Err(TaskEvalError::ReferenceDocs {
            docs: docs.len(),
            reference: reference.len(),
        });
    }
    for (d, r) in docs.iter_mut().zip(reference) {
        d.reference_pred = Some(argmax(&r.loglikelihoods));
        d.reference_loglikelihoods = Some(r.loglikelihoods.clone());
    }
    Ok(paired_figures(docs))
}

/// The paired figures of docs scored with a reference (each doc's reference fields filled in).
pub(super) fn paired_figures(docs: &[DocScore]) -> PairedFigures {
    let n = docs.len();
    let frac = |k: usize| k as f64 / n as f64;
    let correct = docs.iter().filter(|d| d.pred == d.gold).count();
    let mut agree = 0;
    let (mut ref_correct, mut ref_correct_norm) = (0, 0);
    let mut kl = 0.0;
    let mut diffs = Vec::with_capacity(n);
    for d in docs {
        let (Some(ref_lls), Some(ref_pred)) = (&d.reference_loglikelihoods, d.reference_pred)
        else {
            continue;
        };
        let per_char: Vec<f64> = ref_lls
            .iter()
            .zip(&d.choice_chars)
            .map(|(l, &c)| l / c as f64)
            .collect();
        agree += usize::from(ref_pred == d.pred);
        ref_correct += usize::from(ref_pred == d.gold);
        ref_correct_norm += usize::from(argmax(&per_char) == d.gold);
        kl += choice_kl(ref_lls, &d.loglikelihoods);
        diffs.push(f64::from(u8::from(d.pred == d.gold)) - f64::from(u8::from(ref_pred == d.gold)));
    }
    PairedFigures {
        reference: ReferenceAccuracy {
            accuracy: frac(ref_correct),
            acc_norm: frac(ref_correct_norm),
        },
        agreement: frac(agree),
        accuracy_diff: frac(correct) - frac(ref_correct),
        accuracy_diff_ci95: paired_bootstrap_ci95(&diffs),
        choice_kl_mean: kl / n as f64,
    }
}

/// KL(p || q) between the softmax distributions of two models' choice log-likelihoods.
fn choice_kl(p_lls: &[f64], q_lls: &[f64]) -> f64 {
    let (lp, lq) = (log_normalize(p_lls), log_normalize(q_lls));
    lp.iter().zip(&lq).map(|(&p, &q)| p.exp() * (p - q)).sum()
}

/// log-softmax of a few values.
fn log_normalize(v: &[f64]) -> Vec<f64> {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = v.iter().map(|&x| (x - max).exp()).sum::<f64>().ln() + max;
    v.iter().map(|&x| x - lse).collect()
}

/// Percentile interval of the mean of `diffs` over [`BOOTSTRAP_RESAMPLES`] resamples with
/// replacement.
fn paired_bootstrap_ci95(diffs: &[f64]) -> [f64; 2] {
    let n = diffs.len();
    if n == 0 {
        return [0.0, 0.0];
    }
    let mut rng = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| diffs[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = BOOTSTRAP_RESAMPLES / 40;
    [means[tail], means[BOOTSTRAP_RESAMPLES - 1 - tail]]
}
