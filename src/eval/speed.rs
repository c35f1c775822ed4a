//! Prompt processing speed in llama.cpp: decode windows of real tokens, logits of the last
//! position only, and time it (what `llama-bench`'s pp test measures). Models compared are
//! measured in turns ([`compare_prompt_speed`]), so that other work on the machine weighs on each
//! alike, and each keeps its fastest turn.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::llamacpp::{Ctx, LlamaError, LoadedModel};

/// One file's prompt speed, as `hopscotch speed` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileSpeed {
    /// The file.
    pub model: PathBuf,
    /// Its fastest turn's prompt tokens per second.
    pub prompt_tokens_per_s: f64,
}

/// The files compared, in the order given.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct SpeedReport(pub Vec<FileSpeed>);

impl SpeedReport {
    /// `models` with their `speeds` ([`compare_prompt_speed`]'s figures, in the same order).
    pub fn new(models: &[PathBuf], speeds: &[f64]) -> Self {
        let rows = models.iter().zip(speeds);
        SpeedReport(
            rows.map(|(m, &s)| FileSpeed {
                model: m.clone(),
                prompt_tokens_per_s: s,
            })
            .collect(),
        )
    }
}

impl fmt::Display for SpeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, row) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let speed = row.prompt_tokens_per_s;
            write!(f, "{speed:>9.1} prompt tokens/s  {}", row.model.display())?;
        }
        Ok(())
    }
}

/// Window `w` of `n_ctx` tokens of `tokens`, reused cyclically when short.
fn window(tokens: &[u32], n_ctx: usize, w: usize) -> Vec<u32> {
    (0..n_ctx)
        .map(|i| tokens[(w * n_ctx + i) % tokens.len()])
        .collect()
}

/// A context of `n_ctx` tokens on `model` that has decoded window 0 of `tokens` once, untimed;
/// `None` when there are no tokens to decode.
fn warmed_context<'m>(
    model: &'m LoadedModel,
    tokens: &[u32],
    n_ctx: usize,
    threads: usize,
) -> Result<Option<Ctx<'m>>, LlamaError> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut ctx = model.context(n_ctx, threads)?;
    ctx.logits(&window(tokens, n_ctx, 0), &[n_ctx - 1])?;
    Ok(Some(ctx))
}

/// Tokens per second of prompt processing over `windows` windows of `n_ctx` tokens of `tokens`
/// (reused cyclically when short), after one untimed warm-up window.
pub fn prompt_tokens_per_s(
    model: &LoadedModel,
    tokens: &[u32],
    n_ctx: usize,
    windows: usize,
    threads: usize,
) -> Result<f64, LlamaError> {
    let Some(mut ctx) = warmed_context(model, tokens, n_ctx, threads)? else {
        return Ok(0.0);
    };
    let start = Instant::now();
    for w in 0..windows {
        ctx.logits(&window(tokens, n_ctx, w + 1), &[n_ctx - 1])?;
    }
    Ok((windows * n_ctx) as f64 / start.elapsed().as_secs_f64())
}

/// Tokens per second of prompt processing of one model, as fast as it goes: one untimed warm-up
/// window, then `windows` windows of `n_ctx` tokens of `tokens` (reused cyclically when short),
/// each timed alone; the figure is the fastest window's, the one least slowed by other work on
/// the machine. For one model's figure among many measured one after another (a budget run's
/// curve), at less than half the decoding of [`compare_prompt_speed`]'s turns.
pub fn fastest_window_tokens_per_s(
    model: &LoadedModel,
    tokens: &[u32],
    n_ctx: usize,
    windows: usize,
    threads: usize,
) -> Result<f64, LlamaError> {
    let Some(mut ctx) = warmed_context(model, tokens, n_ctx, threads)? else {
        return Ok(0.0);
    };
    let mut best = 0f64;
    for w in 0..windows.max(1) {
        let timed = window(tokens, n_ctx, w + 1);
        let start = Instant::now();
        ctx.logits(&timed, &[n_ctx - 1])?;
        best = best.max(n_ctx as f64 / start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Prompt tokens per second of each of `models`, measured in `rounds` turns (every model once
/// per turn, in order) of [`prompt_tokens_per_s`]; each model's figure is its fastest turn, the
/// one least slowed by other work on the machine.
pub fn compare_prompt_speed(
    models: &[&LoadedModel],
    tokens: &[u32],
    n_ctx: usize,
    windows: usize,
    rounds: usize,
    threads: usize,
) -> Result<Vec<f64>, LlamaError> {
    let mut best = vec![0f64; models.len()];
    for _ in 0..rounds.max(1) {
        for (b, model) in best.iter_mut().zip(models) {
            *b = b.max(prompt_tokens_per_s(model, tokens, n_ctx, windows, threads)?);
        }
    }
    Ok(best)
}
