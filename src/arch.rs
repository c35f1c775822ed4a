//! The architecture description every stage shares: layers, heads, rope, norm epsilon, biases.
//!
//! Read from a Hugging Face `config.json` or from GGUF metadata; written back to either.

use serde::{Deserialize, Serialize};

/// The model families this tool reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2, Llama 3.x, SmolLM) and `MistralForCausalLM`: GGUF arch `llama`.
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v biases, NEOX rope; GGUF arch `qwen2`.
    Qwen2,
}

/// Rope frequency scaling as Hugging Face configs describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's per-frequency scaling (exported as a `rope_freqs` tensor).
    Llama3 {
        /// Overall factor (8 for Llama 3.1).
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pre-trained at.
        original_max_position_embeddings: f64,
    },
}

/// Everything about a model's shape that the stages need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    /// The family (decides GGUF arch name, rope layout and biases).
    pub family: Family,
    /// The Hugging Face architecture name (`LlamaForCausalLM`, ...).
    pub hf_architecture: String,
    /// Number of transformer layers.
    pub n_layer: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// MLP inner width.
    pub n_ff: usize,
    /// Attention heads per layer (query heads).
    pub n_head: usize,
    /// Key/value heads per layer (grouped-query attention).
    pub n_head_kv: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Training context length.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rope base frequency.
    pub rope_theta: f64,
    /// Rope scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases (Qwen2).
    pub attn_bias: bool,
}

impl Arch {
    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// The per-frequency rope factors of Llama 3.1 scaling, as `convert_hf_to_gguf.py` computes
    /// them for the `rope_freqs` tensor; `None` without llama3 scaling.
    pub fn llama3_rope_factors(&self) -> Option<Vec<f32>> {
        let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        }) = self.rope_scaling
        else {
            return None;
        };
        let dim = self.head_dim;
        let low_freq_wavelen = old_ctx / low_freq_factor;
        let high_freq_wavelen = old_ctx / high_freq_factor;
        let factors = (0..dim)
            .step_by(2)
            .map(|i| {
                // float32 arithmetic as torch does it in the reference converter
                let freq = 1.0f32 / (self.rope_theta as f32).powf(i as f32 / dim as f32);
                let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                if wavelen < high_freq_wavelen {
                    1.0
                } else if wavelen > low_freq_wavelen {
                    factor as f32
                } else {
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        Some(factors)
    }
}
