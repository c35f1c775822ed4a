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

impl Arch {
    /// Every tensor the model needs, by GGUF name, with its shape in torch order (`[out, in]`).
    /// `rope_freqs.weight` is not listed: it is derived from the rope scaling.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, q, kv, ff) = (self.n_embd, self.q_dim(), self.kv_dim(), self.n_ff);
        let mut out = vec![("token_embd.weight".to_string(), vec![self.vocab_size, e])];
        for i in 0..self.n_layer {
            let b = |s: &str| format!("blk.{i}.{s}");
            out.push((b("attn_norm.weight"), vec![e]));
            out.push((b("attn_q.weight"), vec![q, e]));
            out.push((b("attn_k.weight"), vec![kv, e]));
            out.push((b("attn_v.weight"), vec![kv, e]));
            if self.attn_bias {
                out.push((b("attn_q.bias"), vec![q]));
                out.push((b("attn_k.bias"), vec![kv]));
                out.push((b("attn_v.bias"), vec![kv]));
            }
            out.push((b("attn_output.weight"), vec![e, q]));
            out.push((b("ffn_norm.weight"), vec![e]));
            out.push((b("ffn_gate.weight"), vec![ff, e]));
            out.push((b("ffn_up.weight"), vec![ff, e]));
            out.push((b("ffn_down.weight"), vec![e, ff]));
        }
        out.push(("output_norm.weight".to_string(), vec![e]));
        if !self.tie_word_embeddings {
            out.push(("output.weight".to_string(), vec![self.vocab_size, e]));
        }
        out
    }

    /// The GGUF architecture name for an unslimmed model of this family.
    pub fn gguf_arch(&self) -> &'static str {
        match self.family {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }

    /// Checks that the numbers are usable (non-zero, heads divide evenly).
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("num_hidden_layers", self.n_layer),
            ("hidden_size", self.n_embd),
            ("intermediate_size", self.n_ff),
            ("num_attention_heads", self.n_head),
            ("num_key_value_heads", self.n_head_kv),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(format!("{k} must be positive"));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.n_head, self.n_head_kv
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rope",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(format!(
                "rms_norm_eps ({}) must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        Ok(())
    }
}

/// Reorders the rows of a q or k projection between Hugging Face's rope layout (halves) and
/// llama.cpp's `llama` layout (interleaved pairs), as `convert_hf_to_gguf.py`'s `permute` does.
/// `data` holds `n_head * head_dim` rows of `row_bytes` bytes each (any dtype: quantization is
/// per row). `to_gguf` picks the direction.
pub fn permute_rope_rows(data: &[u8], row_bytes: usize, n_head: usize, to_gguf: bool) -> Vec<u8> {
    let n_rows = data.len() / row_bytes.max(1);
    let head_dim = n_rows / n_head.max(1);
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for j in 0..half {
            for k in 0..2 {
                let gguf_row = h * head_dim + 2 * j + k;
                let hf_row = h * head_dim + k * half + j;
                let (src, dst) = if to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// 3 layers, width 64, 4 query heads sharing 2 key/value heads of 16, MLP 128, vocabulary 97.
#[cfg(test)]
pub(crate) fn tiny_arch() -> Arch {
    Arch {
        family: Family::Llama,
        hf_architecture: "LlamaForCausalLM".into(),
        n_layer: 3,
        n_embd: 64,
        n_ff: 128,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        vocab_size: 97,
        context_length: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        attn_bias: false,
    }
}
