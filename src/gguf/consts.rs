//! GGUF constants in one place: the header, the reader's limits, metadata key names (per-architecture
//! keys as templates), the HF <-> GGUF tensor names of the Llama family, and llama.cpp's file types.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>; names follow gguf-py's
//! `gguf/constants.py`, numbers llama.cpp's `include/llama.h` and `ggml/include/gguf.h`.

use std::fmt;
use std::str::FromStr;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The version the writer produces. The reader also accepts 2, laid out the same; version 3 added
/// big-endian files, which this crate does not read (their version reads as `0x03000000`).
pub const GGUF_VERSION: u32 = 3;

/// Tensor data alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT` in gguf.h).
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// Longest metadata key the reader accepts. Real keys are under 100 bytes
/// (`tokenizer.ggml.padding_token_id`); 64 KiB only stops a forged length early.
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// Longest string value. The largest real ones are chat templates (tens of KiB); vocabularies and
/// merges are arrays of many short strings, not one long one. 256 MiB is far above anything real
/// and still bounds what one forged length can make us copy.
pub const MAX_STRING_LEN: usize = 256 * 1024 * 1024;

/// Most elements in one array. Vocabularies reach ~256k tokens (Gemma) and merge lists ~300k
/// (Llama 3); 16M leaves a wide margin while bounding the `Value`s one array can allocate.
pub const MAX_ARRAY_LEN: usize = 16 * 1024 * 1024;

/// Most tensors in one file. A 128-layer model with a dozen tensors per layer has ~1.5k;
/// mixture-of-experts files that store experts separately stay in the low tens of thousands.
pub const MAX_TENSOR_COUNT: u64 = 65536;

/// Most dimensions per tensor (`GGML_MAX_DIMS` in ggml.h).
pub const MAX_DIMS: usize = 4;

/// Most metadata key-values in one file. Real files have a few dozen; per-layer settings are
/// arrays, not keys.
pub const MAX_KV_COUNT: u64 = 65536;

/// Longest tensor name llama.cpp loads: ggml stores names in `char[GGML_MAX_NAME]` with
/// `GGML_MAX_NAME = 64`, including the terminating NUL.
pub const MAX_TENSOR_NAME_LEN: usize = 63;

/// `general.architecture`: the llama.cpp architecture name (`llama`, `qwen2`, `deci`).
pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
/// `general.name`: a human-readable model name.
pub const GENERAL_NAME: &str = "general.name";
/// `general.alignment`: tensor data alignment in bytes (u32, a power of two).
pub const GENERAL_ALIGNMENT: &str = "general.alignment";
/// `general.file_type`: llama.cpp's `llama_ftype` of the file (see [`QuantType::ftype_id`]).
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
/// `general.quantization_version`: version of the quantized block layouts (2 today).
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";

/// A per-architecture key: `arch_key("llama", BLOCK_COUNT)` is `llama.block_count`.
pub fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

/// Suffix of `{arch}.context_length`: the trained context length.
pub const CONTEXT_LENGTH: &str = "context_length";
/// Suffix of `{arch}.embedding_length`: the hidden size.
pub const EMBEDDING_LENGTH: &str = "embedding_length";
/// Suffix of `{arch}.block_count`: the number of transformer blocks.
pub const BLOCK_COUNT: &str = "block_count";
/// Suffix of `{arch}.feed_forward_length`: the MLP's intermediate size.
pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
/// Suffix of `{arch}.attention.head_count`: query heads (an array per layer for `deci`).
pub const ATTENTION_HEAD_COUNT: &str = "attention.head_count";
/// Suffix of `{arch}.attention.head_count_kv`: key/value heads (an array per layer for `deci`).
pub const ATTENTION_HEAD_COUNT_KV: &str = "attention.head_count_kv";
/// Suffix of `{arch}.attention.layer_norm_rms_epsilon`: the RMSNorm epsilon.
pub const ATTENTION_LAYER_NORM_RMS_EPSILON: &str = "attention.layer_norm_rms_epsilon";
/// Suffix of `{arch}.rope.dimension_count`: rotated dimensions per head.
pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
/// Suffix of `{arch}.rope.freq_base`: rope theta.
pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
/// Suffix of `{arch}.rope.scaling.type`: `none`, `linear` or `yarn`.
pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
/// Suffix of `{arch}.rope.scaling.factor`: the context extension factor.
pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
/// Suffix of `{arch}.rope.scaling.original_context_length`: context before extension.
pub const ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH: &str = "rope.scaling.original_context_length";
/// Suffix of `{arch}.vocab_size`: rows of the token embedding.
pub const VOCAB_SIZE: &str = "vocab_size";
/// Suffix of `{arch}.attention.key_length`: head size of keys and queries.
pub const ATTENTION_KEY_LENGTH: &str = "attention.key_length";
/// Suffix of `{arch}.attention.value_length`: head size of values.
pub const ATTENTION_VALUE_LENGTH: &str = "attention.value_length";

/// `tokenizer.ggml.model`: the tokenizer kind (`gpt2` for byte-level BPE, `llama` for SentencePiece).
pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
/// `tokenizer.ggml.pre`: the pre-tokenizer llama.cpp applies (`llama-bpe`, `qwen2`, ...).
pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
/// `tokenizer.ggml.tokens`: the vocabulary, an array of strings indexed by token id.
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
/// `tokenizer.ggml.token_type`: an i32 per token (normal, control, byte, ...).
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// `tokenizer.ggml.scores`: an f32 per token (SentencePiece scores).
pub const TOKENIZER_SCORES: &str = "tokenizer.ggml.scores";
/// `tokenizer.ggml.merges`: BPE merges, each `"left right"`.
pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
/// `tokenizer.ggml.bos_token_id`: beginning-of-sequence token id.
pub const TOKENIZER_BOS_TOKEN_ID: &str = "tokenizer.ggml.bos_token_id";
/// `tokenizer.ggml.eos_token_id`: end-of-sequence token id.
pub const TOKENIZER_EOS_TOKEN_ID: &str = "tokenizer.ggml.eos_token_id";
/// `tokenizer.ggml.unknown_token_id`: unknown-token id.
pub const TOKENIZER_UNKNOWN_TOKEN_ID: &str = "tokenizer.ggml.unknown_token_id";
/// `tokenizer.ggml.padding_token_id`: padding token id.
pub const TOKENIZER_PADDING_TOKEN_ID: &str = "tokenizer.ggml.padding_token_id";
/// `tokenizer.ggml.add_bos_token`: whether to prepend BOS when tokenizing.
pub const TOKENIZER_ADD_BOS_TOKEN: &str = "tokenizer.ggml.add_bos_token";
/// `tokenizer.ggml.add_eos_token`: whether to append EOS when tokenizing.
pub const TOKENIZER_ADD_EOS_TOKEN: &str = "tokenizer.ggml.add_eos_token";
/// `tokenizer.ggml.add_space_prefix`: whether SentencePiece prepends a space.
pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
/// `tokenizer.chat_template`: the Jinja chat template.
pub const TOKENIZER_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The Hugging Face architectures whose tensor names [`hf_to_gguf_name`] maps.
pub const LLAMA_FAMILY_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// GGUF name of the token embedding.
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// GGUF name of the output projection (absent when tied to the embedding).
pub const OUTPUT: &str = "output.weight";
/// GGUF name of the final norm.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// GGUF name of the rope frequency factors (Llama 3.1 rope scaling); it has no HF tensor,
/// the converter computes it from `rope_scaling` in config.json.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Whole-model tensors: (HF name, GGUF name).
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", TOKEN_EMBD),
    ("lm_head.weight", OUTPUT),
    ("model.norm.weight", OUTPUT_NORM),
];

/// Per-block tensors: (HF suffix after `model.layers.N.`, GGUF suffix after `blk.N.`).
const BLOCK_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The GGUF name of block `block`'s tensor `suffix`: `blk_tensor(3, "attn_q.weight")` is
/// `blk.3.attn_q.weight`.
pub fn blk_tensor(block: usize, suffix: &str) -> String {
    format!("blk.{block}.{suffix}")
}

/// Splits `{prefix}{N}.{rest}` into `(N, rest)`; `N` must be written canonically (no sign, no
/// leading zeros) so that mapping back gives the same name.
fn split_block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (index, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let block: usize = index.parse().ok()?;
    (block.to_string() == index).then_some((block, rest))
}

/// The GGUF name of a Llama-family HF tensor, or `None` for a tensor the GGUF file does not keep
/// under a mapped name (for example `rotary_emb.inv_freq`).
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some(&(_, gguf)) = GLOBAL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some(gguf.to_string());
    }
    let (block, rest) = split_block(hf, "model.layers.")?;
    let &(_, gguf) = BLOCK_TENSORS.iter().find(|(h, _)| *h == rest)?;
    Some(blk_tensor(block, gguf))
}

/// The HF name of a Llama-family GGUF tensor, or `None` for one with no HF counterpart
/// ([`ROPE_FREQS`]) or one outside the map.
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some(&(hf, _)) = GLOBAL_TENSORS.iter().find(|(_, g)| *g == gguf) {
        return Some(hf.to_string());
    }
    let (block, rest) = split_block(gguf, "blk.")?;
    let &(hf, _) = BLOCK_TENSORS.iter().find(|(_, g)| *g == rest)?;
    Some(format!("model.layers.{block}.{hf}"))
}

/// A llama.cpp quantization preset, spelled as `llama-quantize` takes it on the command line;
/// each is one `llama_ftype` value, stored in `general.file_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// `f32`: every tensor in f32 (`LLAMA_FTYPE_ALL_F32`).
    F32,
    /// `f16`: matrices in f16.
    F16,
    /// `bf16`: matrices in bf16.
    Bf16,
    /// `q4_0`: 4-bit, one scale per 32 weights.
    Q4_0,
    /// `q4_1`: 4-bit, scale and minimum per 32 weights.
    Q4_1,
    /// `q5_0`: 5-bit, one scale per 32 weights.
    Q5_0,
    /// `q5_1`: 5-bit, scale and minimum per 32 weights.
    Q5_1,
    /// `q8_0`: 8-bit, one scale per 32 weights.
    Q8_0,
    /// `q2_k`: 2-bit k-quant mix.
    Q2K,
    /// `q2_k_s`: smaller 2-bit k-quant mix (needs an importance matrix).
    Q2KS,
    /// `q3_k_s`: small 3-bit k-quant mix.
    Q3KS,
    /// `q3_k_m`: medium 3-bit k-quant mix.
    Q3KM,
    /// `q3_k_l`: large 3-bit k-quant mix.
    Q3KL,
    /// `q4_k_s`: small 4-bit k-quant mix.
    Q4KS,
    /// `q4_k_m`: medium 4-bit k-quant mix (the usual default).
    Q4KM,
    /// `q5_k_s`: small 5-bit k-quant mix.
    Q5KS,
    /// `q5_k_m`: medium 5-bit k-quant mix.
    Q5KM,
    /// `q6_k`: 6-bit k-quant.
    Q6K,
    /// `iq2_xxs`: 2.06 bits per weight (needs an importance matrix).
    Iq2Xxs,
    /// `iq2_xs`: 2.31 bits per weight (needs an importance matrix).
    Iq2Xs,
    /// `iq2_s`: 2.5 bits per weight (needs an importance matrix).
    Iq2S,
    /// `iq2_m`: 2.7 bits per weight (needs an importance matrix).
    Iq2M,
    /// `iq3_xxs`: 3.06 bits per weight.
    Iq3Xxs,
    /// `iq3_xs`: 3.3 bits per weight.
    Iq3Xs,
    /// `iq3_s`: 3.44 bits per weight.
    Iq3S,
    /// `iq3_m`: 3.66 bits per weight.
    Iq3M,
    /// `iq1_s`: 1.56 bits per weight (needs an importance matrix).
    Iq1S,
    /// `iq1_m`: 1.75 bits per weight (needs an importance matrix).
    Iq1M,
    /// `iq4_nl`: 4.5 bits per weight, non-linear, 32-weight blocks.
    Iq4Nl,
    /// `iq4_xs`: 4.25 bits per weight, non-linear.
    Iq4Xs,
    /// `tq1_0`: ternary, 1.69 bits per weight.
    Tq1_0,
    /// `tq2_0`: ternary, 2.06 bits per weight.
    Tq2_0,
    /// `mxfp4_moe`: MXFP4 for mixture-of-experts tensors.
    Mxfp4Moe,
}

/// Every preset with its command-line name and `llama_ftype` id (llama.h, checked against
/// llama.cpp as vendored by llama-cpp-sys-2 0.1.160).
const QUANT_TABLE: &[(QuantType, &str, u32)] = &[
    (QuantType::F32, "f32", 0),
    (QuantType::F16, "f16", 1),
    (QuantType::Q4_0, "q4_0", 2),
    (QuantType::Q4_1, "q4_1", 3),
    (QuantType::Q8_0, "q8_0", 7),
    (QuantType::Q5_0, "q5_0", 8),
    (QuantType::Q5_1, "q5_1", 9),
    (QuantType::Q2K, "q2_k", 10),
    (QuantType::Q3KS, "q3_k_s", 11),
    (QuantType::Q3KM, "q3_k_m", 12),
    (QuantType::Q3KL, "q3_k_l", 13),
    (QuantType::Q4KS, "q4_k_s", 14),
    (QuantType::Q4KM, "q4_k_m", 15),
    (QuantType::Q5KS, "q5_k_s", 16),
    (QuantType::Q5KM, "q5_k_m", 17),
    (QuantType::Q6K, "q6_k", 18),
    (QuantType::Iq2Xxs, "iq2_xxs", 19),
    (QuantType::Iq2Xs, "iq2_xs", 20),
    (QuantType::Q2KS, "q2_k_s", 21),
    (QuantType::Iq3Xs, "iq3_xs", 22),
    (QuantType::Iq3Xxs, "iq3_xxs", 23),
    (QuantType::Iq1S, "iq1_s", 24),
    (QuantType::Iq4Nl, "iq4_nl", 25),
    (QuantType::Iq3S, "iq3_s", 26),
    (QuantType::Iq3M, "iq3_m", 27),
    (QuantType::Iq2S, "iq2_s", 28),
    (QuantType::Iq2M, "iq2_m", 29),
    (QuantType::Iq4Xs, "iq4_xs", 30),
    (QuantType::Iq1M, "iq1_m", 31),
    (QuantType::Bf16, "bf16", 32),
    (QuantType::Tq1_0, "tq1_0", 36),
    (QuantType::Tq2_0, "tq2_0", 37),
    (QuantType::Mxfp4Moe, "mxfp4_moe", 38),
];

/// A quantization name that is not one of [`QuantType::all`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quantization type {name:?}; accepted: {}", accepted_names())]
pub struct UnknownQuantType {
    /// The name as given.
    pub name: String,
}

fn accepted_names() -> String {
    QUANT_TABLE
        .iter()
        .map(|r| r.1)
        .collect::<Vec<_>>()
        .join(", ")
}

impl QuantType {
    fn row(self) -> &'static (QuantType, &'static str, u32) {
        QUANT_TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every QuantType has a table row")
    }

    /// The preset for a command-line name, ignoring case (`Q4_K_M` and `q4_k_m` both work).
    pub fn from_name(name: &str) -> Result<QuantType, UnknownQuantType> {
        let lower = name.to_ascii_lowercase();
        QUANT_TABLE
            .iter()
            .find(|r| r.1 == lower)
            .map(|r| r.0)
            .ok_or_else(|| UnknownQuantType {
                name: name.to_string(),
            })
    }

    /// The preset stored as `general.file_type = id`, or `None` for an id not in the table
    /// (removed types, newer types, `LLAMA_FTYPE_GUESSED`).
    pub fn from_ftype_id(id: u32) -> Option<QuantType> {
        QUANT_TABLE.iter().find(|r| r.2 == id).map(|r| r.0)
    }

    /// The command-line name, lower case (`q4_k_m`).
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// llama.cpp's `llama_ftype` value, as stored in `general.file_type`.
    pub fn ftype_id(self) -> u32 {
        self.row().2
    }

    /// Whether llama.cpp's quantizer refuses this preset without an importance matrix
    /// (`tensor_requires_imatrix` in `llama-quant.cpp`: the iq1 and iq2 types and `q2_k_s`;
    /// measured on SmolLM2-135M, every other preset quantizes without one).
    pub fn needs_imatrix(self) -> bool {
        matches!(
            self,
            QuantType::Q2KS
                | QuantType::Iq2Xxs
                | QuantType::Iq2Xs
                | QuantType::Iq2S
                | QuantType::Iq2M
                | QuantType::Iq1S
                | QuantType::Iq1M
        )
    }

    /// Every preset, in `llama_ftype` order.
    pub fn all() -> impl Iterator<Item = QuantType> {
        QUANT_TABLE.iter().map(|r| r.0)
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = UnknownQuantType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuantType::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_names_round_trip_and_ids_are_unique() {
        let mut ids = std::collections::HashSet::new();
        for q in QuantType::all() {
            assert_eq!(QuantType::from_name(q.name()), Ok(q));
            assert_eq!(QuantType::from_name(&q.name().to_uppercase()), Ok(q));
            assert_eq!(QuantType::from_ftype_id(q.ftype_id()), Some(q));
            assert!(ids.insert(q.ftype_id()), "duplicate id for {q}");
        }
        assert_eq!(QuantType::all().count(), 33);
    }

    #[test]
    fn quant_ids_match_llama_h() {
        let expect = [
            ("f32", 0),
            ("f16", 1),
            ("q4_0", 2),
            ("q4_1", 3),
            ("q8_0", 7),
            ("q5_0", 8),
            ("q5_1", 9),
            ("q2_k", 10),
            ("q3_k_s", 11),
            ("q3_k_m", 12),
            ("q3_k_l", 13),
            ("q4_k_s", 14),
            ("q4_k_m", 15),
            ("q5_k_s", 16),
            ("q5_k_m", 17),
            ("q6_k", 18),
            ("iq2_xxs", 19),
            ("iq2_xs", 20),
            ("q2_k_s", 21),
            ("iq3_xs", 22),
            ("iq3_xxs", 23),
            ("iq1_s", 24),
            ("iq4_nl", 25),
            ("iq3_s", 26),
            ("iq3_m", 27),
            ("iq2_s", 28),
            ("iq2_m", 29),
            ("iq4_xs", 30),
            ("iq1_m", 31),
            ("bf16", 32),
            ("tq1_0", 36),
            ("tq2_0", 37),
            ("mxfp4_moe", 38),
        ];
        for (name, id) in expect {
            assert_eq!(QuantType::from_name(name).map(|q| q.ftype_id()), Ok(id));
        }
        assert_eq!(QuantType::Q4KM.to_string(), "q4_k_m");
        assert_eq!("Q8_0".parse::<QuantType>(), Ok(QuantType::Q8_0));
    }

    #[test]
    fn unknown_quant_lists_accepted_names() {
        let err = QuantType::from_name("q4_k_x").unwrap_err().to_string();
        assert!(err.contains("q4_k_x"), "{err}");
        for q in QuantType::all() {
            assert!(err.contains(q.name()), "{err} lacks {q}");
        }
    }

    #[test]
    fn tensor_names_map_both_ways() {
        let pairs = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.norm.weight", "output_norm.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.17.self_attn.q_proj.weight",
                "blk.17.attn_q.weight",
            ),
            (
                "model.layers.17.self_attn.q_proj.bias",
                "blk.17.attn_q.bias",
            ),
            ("model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"),
            (
                "model.layers.3.self_attn.v_proj.weight",
                "blk.3.attn_v.weight",
            ),
            (
                "model.layers.31.self_attn.o_proj.weight",
                "blk.31.attn_output.weight",
            ),
            (
                "model.layers.2.post_attention_layernorm.weight",
                "blk.2.ffn_norm.weight",
            ),
            (
                "model.layers.2.mlp.gate_proj.weight",
                "blk.2.ffn_gate.weight",
            ),
            ("model.layers.2.mlp.up_proj.weight", "blk.2.ffn_up.weight"),
            (
                "model.layers.10.mlp.down_proj.weight",
                "blk.10.ffn_down.weight",
            ),
        ];
        for (hf, gguf) in pairs {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(gguf_to_hf_name(gguf).as_deref(), Some(hf));
        }
        for (hf, gguf) in GLOBAL_TENSORS {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(*gguf));
        }
        for (hf, gguf) in BLOCK_TENSORS {
            let h = format!("model.layers.5.{hf}");
            let g = blk_tensor(5, gguf);
            assert_eq!(hf_to_gguf_name(&h), Some(g.clone()));
            assert_eq!(gguf_to_hf_name(&g), Some(h));
        }
    }

    #[test]
    fn unmapped_tensor_names() {
        assert_eq!(gguf_to_hf_name(ROPE_FREQS), None);
        for name in [
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "model.layers.01.mlp.up_proj.weight",
            "model.layers.+1.mlp.up_proj.weight",
            "model.layers..mlp.up_proj.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.99999999999999999999999.mlp.up_proj.weight",
            "model.layers.1",
            "",
        ] {
            assert_eq!(hf_to_gguf_name(name), None, "{name}");
        }
        for name in [
            "blk.01.attn_q.weight",
            "blk.1.attn_qkv.weight",
            "blk.",
            "blk.1",
        ] {
            assert_eq!(gguf_to_hf_name(name), None, "{name}");
        }
    }

    #[test]
    fn arch_keys() {
        assert_eq!(arch_key("llama", BLOCK_COUNT), "llama.block_count");
        assert_eq!(
            arch_key("deci", ATTENTION_HEAD_COUNT_KV),
            "deci.attention.head_count_kv"
        );
    }
}
