//! Prompt processing speed in llama.cpp: decode windows of real tokens, logits of the last
//! position only, and time it (what `llama-bench`'s pp test measures).

use std::time::Instant;

use crate::llamacpp::{LlamaError, LoadedModel};

/// Tokens per second of prompt processing over `windows` windows of `n_ctx` tokens of `tokens`
/// (reused cyclically when short), after one untimed warm-up window.
pub fn prompt_tokens_per_s(
    model: &LoadedModel,
    tokens: &[u32],
    n_ctx: usize,
    windows: usize,
    threads: usize,
) -> Result<f64, LlamaError> {
    if tokens.is_empty() {
        return Ok(0.0);
    }
    let mut ctx = model.context(n_ctx, threads)?;
    let window = |w: usize| -> Vec<u32> {
        (0..n_ctx)
            .map(|i| tokens[(w * n_ctx + i) % tokens.len()])
            .collect()
    };
    ctx.logits(&window(0), &[n_ctx - 1])?;
    let start = Instant::now();
    for w in 0..windows {
        ctx.logits(&window(w + 1), &[n_ctx - 1])?;
    }
    Ok((windows * n_ctx) as f64 / start.elapsed().as_secs_f64())
}
