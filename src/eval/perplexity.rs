//! Perplexity as `llama-perplexity` computes it: the text is tokenized once, cut into windows of
//! `n_ctx` tokens, the window's first token replaced by BOS when the model adds one, and only
//! the second half of each window is scored (each scored token then sees at least n_ctx/2 of
//! context). With a reference model, KL(reference || model) and top-1 agreement on the same
//! positions (`llama-perplexity --kl-divergence`).

use std::path::Path;

use serde::Serialize;

use crate::llamacpp::{log_softmax, LlamaError, LoadedModel};

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// llama.cpp failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// The text is too short for one window.
    #[error("{path}: the text has {tokens} tokens, fewer than one window of {n_ctx}")]
    TooShort {
        /// The text file.
        path: String,
        /// Tokens in the text.
        tokens: usize,
        /// Window size.
        n_ctx: usize,
    },
    /// The two models do not share a vocabulary.
    #[error("{model} has {a} tokens in its vocabulary but the reference {reference} has {b}")]
    VocabMismatch {
        /// The model.
        model: String,
        /// The reference.
        reference: String,
        /// Model vocabulary size.
        a: usize,
        /// Reference vocabulary size.
        b: usize,
    },
}

/// Perplexity (and, with a reference, KL and top-1 agreement) of one model on one text.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// exp(mean negative log-likelihood) over scored tokens.
    pub perplexity: f64,
    /// Mean KL(reference || model) per scored token, in nats; `None` without a reference.
    pub kl_mean: Option<f64>,
    /// Fraction of scored positions where both models' most likely next token agree.
    pub top1_agreement: Option<f64>,
    /// Perplexity of the reference on the same tokens.
    pub reference_perplexity: Option<f64>,
    /// Tokens scored.
    pub tokens: usize,
    /// Window size.
    pub n_ctx: usize,
    /// Windows evaluated.
    pub windows: usize,
}

impl std::fmt::Display for PerplexityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "tokens scored    {} ({} windows of {})",
            self.tokens, self.windows, self.n_ctx
        )?;
        write!(f, "perplexity       {:.4}", self.perplexity)?;
        if let (Some(kl), Some(top1), Some(rp)) =
            (self.kl_mean, self.top1_agreement, self.reference_perplexity)
        {
            write!(
                f,
                "\nreference ppl    {rp:.4}\nKL mean          {kl:.6}\ntop-1 agreement  {:.2}%",
                top1 * 100.0
            )?;
        }
        Ok(())
    }
}

/// Evaluates `model` on `text` in windows of `n_ctx` tokens (at most `max_windows` of them,
/// all when `None`), against `reference` if given.
pub fn perplexity(
    model: &LoadedModel,
    reference: Option<&LoadedModel>,
    text: &str,
    text_path: &Path,
    n_ctx: usize,
    max_windows: Option<usize>,
    threads: usize,
) -> Result<PerplexityReport, EvalError> {
    if let Some(r) = reference {
        same_vocab(model, r)?;
    }
    let add_bos = model.model.vocab().should_add_bos();
    let tokens = model.tokenize(text, add_bos);
    let n_windows = (tokens.len() / n_ctx).min(max_windows.unwrap_or(usize::MAX));
    if n_windows == 0 {
        return Err(EvalError::TooShort {
            path: text_path.display().to_string(),
            tokens: tokens.len(),
            n_ctx,
        });
    }
    let bos = model.model.vocab().bos().0 as u32;
    let mut ctx = model.context(n_ctx, threads)?;
    let mut ref_ctx = reference.map(|r| r.context(n_ctx, threads)).transpose()?;
    let first = n_ctx / 2;
    let want: Vec<usize> = (first..n_ctx - 1).collect();
    let (mut nll, mut ref_nll, mut kl, mut agree, mut n) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for w in 0..n_windows {
        let mut window = tokens[w * n_ctx..(w + 1) * n_ctx].to_vec();
        if add_bos {
            window[0] = bos;
        }
        let logits = ctx.logits(&window, &want)?;
        let ref_logits = match ref_ctx.as_mut() {
            Some(c) => Some(c.logits(&window, &want)?),
            None => None,
        };
        for (k, &pos) in want.iter().enumerate() {
            let next = tokens[w * n_ctx + pos + 1] as usize;
            let lp = log_softmax(&logits[k]);
            nll -= lp[next];
            if let Some(rl) = &ref_logits {
                let rp = log_softmax(&rl[k]);
                ref_nll -= rp[next];
                kl += rp
                    .iter()
                    .zip(&lp)
                    .map(|(&r, &m)| r.exp() * (r - m))
                    .sum::<f64>();
                if argmax(&logits[k]) == argmax(&rl[k]) {
                    agree += 1;
                }
            }
            n += 1;
        }
    }
    let has_ref = reference.is_some();
    Ok(PerplexityReport {
        perplexity: (nll / n as f64).exp(),
        kl_mean: has_ref.then(|| kl / n as f64),
        top1_agreement: has_ref.then(|| agree as f64 / n as f64),
        reference_perplexity: has_ref.then(|| (ref_nll / n as f64).exp()),
        tokens: n,
        n_ctx,
        windows: n_windows,
    })
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Refuses a reference whose vocabulary differs from the model's: their distributions cannot
/// be compared token for token.
pub fn same_vocab(model: &LoadedModel, reference: &LoadedModel) -> Result<(), EvalError> {
    if reference.n_vocab() != model.n_vocab() {
        return Err(EvalError::VocabMismatch {
            model: model.path.display().to_string(),
            reference: reference.path.display().to_string(),
            a: model.n_vocab(),
            b: reference.n_vocab(),
        });
    }
    Ok(())
}
