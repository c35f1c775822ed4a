//! The fit's peak memory, estimated before any work from the model's shape and the settings, and
//! checked against what the machine has (or `HOPSCOTCH_MEMORY_LIMIT`), so that a fit too big
//! for the machine stops at once with the figures instead of being killed by the kernel.
//!
//! What the estimate counts, in bytes:
//! - the checkpoint's stored bytes, mapped: the fingerprint reads them all, and on the CPU the
//!   model multiplies by them where they lie ([`WeightStorage::Stored`]);
//! - the frozen weights the model holds in f32: the norms and biases on the CPU, every weight
//!   where they are dequantized whole ([`WeightStorage::Dense`]);
//! - the teacher's outputs for the KL objective: per position of the final training's documents,
//!   `teacher_top_k` token ids and log-probabilities;
//! - per thread, the larger of a training step's part ([`PART_ROWS`] sequences: every layer's
//!   activations kept for the backward pass, or with recomputation every layer's input and output
//!   and one layer's activations; and the logits of a chunk of the vocabulary at a run of
//!   [`LOGIT_ROWS`] targets, or whole rows at every target for a full teacher) and a batch scored
//!   without gradients (its layers' transient tensors and the whole-vocabulary logits of one run
//!   of targets, while the screening or the teacher runs);
//! - the residual stream cached at every layer for the screening or, unless
//!   `--no-linear-attention`, the stand-ins' sums and solves before it ([`linear::fit_bytes`]),
//!   whichever is larger, and the stand-ins kept for the search ([`linear::kept_bytes`]);
//! - [`FIXED_BYTES`] for the binary, llama.cpp, the tokenizer and the allocator.
//!
//! Every sequence is counted at `--max-seq-len`, every position as a target, and no prefix as
//! shared: an upper bound for tasks whose documents are shorter or begin alike.

use std::fmt;

use super::batch::{whole_logit_rows, whole_teacher, LOGIT_ROWS, PART_ROWS};
use super::linear;
use crate::checkpoint::Checkpoint;
use crate::model::{logit_chunk_tokens, WeightStorage};
use crate::plan::{FitSettings, Objective};

/// The process's own footprint before the fit's data: the binary with llama.cpp and candle, the
/// tokenizer and the allocator's arenas (a tiny model's fit peaks at about this).
pub const FIXED_BYTES: u64 = 160 << 20;

/// Sequences per document the stand-ins' fit is counted at: a multiple-choice document is a
/// sequence per choice (four for ARC and HellaSwag, two for PIQA and WinoGrande).
pub const STAND_IN_ROWS_PER_DOC: usize = 4;

/// The environment variable that caps the fit's memory, in bytes or with a K, M, G or T suffix
/// (powers of 1024); without it the cap is the memory the system has available.
pub const LIMIT_VAR: &str = "HOPSCOTCH_MEMORY_LIMIT";

/// A fit's estimated peak memory, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The frozen weights the model holds in f32.
    pub weights: u64,
    /// The checkpoint's stored bytes.
    pub mapped: u64,
    /// The teacher's outputs.
    pub teacher: u64,
    /// What one thread holds at its peak.
    pub per_thread: u64,
    /// Threads working side by side.
    pub threads: u64,
    /// Held once for all threads: the screening's residual cache (or the stand-ins' sums) and
    /// the stand-ins.
    pub shared: u64,
    /// Whether training recomputes each layer's activations in the backward pass.
    pub recompute: bool,
}

impl MemoryEstimate {
    /// The estimate of a fit of `ck` with `settings` on `threads` threads, the model's weights
    /// held as `storage` says, recomputing activations in training or not.
    pub fn of(
        ck: &Checkpoint,
        settings: &FitSettings,
        threads: usize,
        storage: WeightStorage,
        recompute: bool,
    ) -> Self {
        let a = &ck.arch;
        let f32s = |n: u64| 4 * n;
        let (layers, d, ff, heads) = (
            a.n_layer as u64,
            a.n_embd as u64,
            a.n_ff as u64,
            a.n_head as u64,
        );
        let (kv, vocab) = (a.kv_dim() as u64, a.vocab_size as u64);
        let t = settings.max_seq_len as u64;
        let b = settings.batch_size as u64;
        let weights = f32s(
            ck.tensors
                .iter()
                .filter(|e| storage == WeightStorage::Dense || e.shape.len() < 2)
                .map(|e| e.n_elements() as u64)
                .sum(),
        );
        let mapped = ck.tensors.iter().map(|e| e.n_bytes() as u64).sum();
        let docs = settings.resolved_final_docs() as u64;
        let teacher = match settings.objective {
            Objective::Kl => docs * t * (8 * settings.teacher_top_k as u64 + 8),
            Objective::Ce | Objective::Choice => 0,
        };
        // per token and layer, what the backward pass keeps: the norms, projections, rope'd
        // heads, attention scores and probabilities, and the MLP's four ff-wide tensors
        let per_token_layer = 10 * d + 3 * kv + 4 * ff + 2 * heads * t;
        let part_tokens = PART_ROWS as u64 * t;
        let activations = if recompute {
            // every layer's input and output, and the layer being recomputed
            part_tokens * (2 * layers * d + per_token_layer)
        } else {
            part_tokens * layers * per_token_layer
        };
        // the logits at a part's targets: whole rows for a full teacher, else a chunk of the
        // vocabulary at a time for one run of targets
        let logits = if settings.objective == Objective::Kl
            && whole_teacher(settings.teacher_top_k, a.vocab_size)
        {
            part_tokens * vocab
        } else {
            part_tokens.min(LOGIT_ROWS as u64) * logit_chunk_tokens(a.n_embd) as u64
        };
        let train_part = f32s(activations) + f32s(3 * logits);
        // a batch scored without gradients: its layers' transient tensors, and the logits of
        // one run of its targets with their log-softmax and the teacher's host copy
        let logit_rows = (b * t).min(whole_logit_rows(a.vocab_size) as u64);
        let scored_batch =
            f32s(3 * logit_rows * vocab) + f32s(b * t * (3 * ff + 2 * d + 2 * heads * t));
        // the screening's residual cache, or (earlier in the fit, and not with it) the
        // stand-ins' sums and solves; the stand-ins kept through both
        let cache = f32s(layers * b * t * d);
        let shared = if settings.linear_attention {
            let skippable = a.n_layer.saturating_sub(1);
            let rows = STAND_IN_ROWS_PER_DOC * settings.resolved_final_docs();
            let fitting = linear::fit_bytes(
                a.n_embd,
                a.q_dim(),
                skippable,
                threads,
                rows,
                settings.max_seq_len,
            );
            cache.max(fitting) + linear::kept_bytes(a.n_embd, skippable, storage)
        } else {
            cache
        };
        MemoryEstimate {
            weights,
            mapped,
            teacher,
            per_thread: train_part.max(scored_batch),
            threads: threads.max(1) as u64,
            shared,
            recompute,
        }
    }

    /// What the fit holds whatever the settings: [`FIXED_BYTES`], the f32 weights and the
    /// checkpoint.
    pub fn model_bytes(&self) -> u64 {
        FIXED_BYTES + self.weights + self.mapped
    }

    /// The whole estimate, [`FIXED_BYTES`] included.
    pub fn total(&self) -> u64 {
        FIXED_BYTES
            + self.weights
            + self.mapped
            + self.teacher
            + self.shared
            + self.threads * self.per_thread
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peak memory about {}: weights {}, checkpoint {}, teacher {}, {} x {} per thread, {} shared",
            bytes(self.total()),
            bytes(self.weights),
            bytes(self.mapped),
            bytes(self.teacher),
            self.threads,
            bytes(self.per_thread),
            bytes(self.shared)
        )?;
        if self.recompute {
            write!(
                f,
                "; each layer's activations recomputed in training to fit"
            )?;
        }
        Ok(())
    }
}

/// `n` bytes in MiB or GiB, as people read them.
pub fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

/// Where the memory cap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Budget {
    /// [`LIMIT_VAR`], as given.
    Limit(u64),
    /// The system's available memory (`MemAvailable` of /proc/meminfo).
    Available(u64),
}

impl Budget {
    /// The cap: [`LIMIT_VAR`] when set, else the memory available now; `None` when neither can
    /// be read (no check then). A malformed [`LIMIT_VAR`] is an error naming it.
    pub fn current() -> Result<Option<Budget>, String> {
        if let Ok(text) = std::env::var(LIMIT_VAR) {
            return parse_bytes(&text)
                .map(|n| Some(Budget::Limit(n)))
                .ok_or_else(|| {
                    format!("{LIMIT_VAR}={text:?}: expected bytes, or a number with K, M, G or T")
                });
        }
        Ok(std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_available(&m))
            .map(Budget::Available))
    }

    /// The cap in bytes.
    pub fn bytes(&self) -> u64 {
        match *self {
            Budget::Limit(n) | Budget::Available(n) => n,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Budget::Limit(n) => write!(f, "the {} {LIMIT_VAR} allows", bytes(n)),
            Budget::Available(n) => write!(f, "the {} the system has available", bytes(n)),
        }
    }
}

/// This process's peak resident memory so far (`VmHWM` of /proc/self/status), in bytes; `None`
/// where it cannot be read.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes from `123`, `512M`, `8G`, `1.5T` (powers of 1024; a trailing `B` or `iB` allowed).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (number, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    let value: f64 = number.trim().parse().ok()?;
    let n = value * (1u64 << shift) as f64;
    (value.is_finite() && value >= 0.0 && n < u64::MAX as f64).then_some(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_binary_suffixes_and_bad_ones_are_refused() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("8G"), Some(8 << 30));
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("1.5k"), Some(1536));
        for bad in ["", "G", "-1G", "eight", "1X", "nan"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }
}
