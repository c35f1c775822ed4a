//! Tokenizer metadata both ways: an HF `tokenizer.json` (+ `tokenizer_config.json`) becomes the GGUF
//! `tokenizer.*` keys exactly as llama.cpp's `convert_hf_to_gguf.py` writes them, and those keys become a
//! `tokenizer.json` that HF `tokenizers` loads and that tokenizes like the original.
//! Keys: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer>
//!
//! Two tokenizer families are handled, as the converter names them in `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE (`_set_vocab_gpt2` / `get_vocab_base`); the pre-tokenizer is identified by
//!   hashing the tokenization of [`CHKTXT`] (`get_vocab_base_pre`).
//! - `llama`: SentencePiece-style BPE with byte fallback (`_set_vocab_llama_hf` / `LlamaHfVocab`).
//!
//! The pieces: `from_hf` reads the HF files, `to_hf` writes them back, `gguf_kvs` is the GGUF
//! key-value form, and `pre_tokenizer` names a `gpt2` pre-tokenizer by its chktxt hash.

use std::path::PathBuf;

mod from_hf;
mod gguf_kvs;
mod pre_tokenizer;
mod to_hf;

pub use pre_tokenizer::{chktxt_hash, detect_pre_tokenizer, CHKTXT};
pub use to_hf::SUPPORTED_GPT2_PRE;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
const KEY_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.cpp's token types (gguf-py `TokenType`), one per token under `tokenizer.ggml.token_type`.
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token (an added token marked `special`: BOS, EOS, chat markers).
    pub const CONTROL: i32 = 3;
    /// An added token that is not special.
    pub const USER_DEFINED: i32 = 4;
    /// A slot with no token of its own, written as `[PAD{id}]`.
    pub const UNUSED: i32 = 5;
    /// A byte-fallback token `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// What can go wrong reading or writing tokenizer metadata.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file parsed but lacks something this module needs.
    #[error("{path}: expected {expected}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was expected there.
        expected: String,
    },
    /// `tokenizer.json` holds a tokenizer model other than BPE (WordPiece, Unigram, WordLevel).
    #[error(
        "{path}: tokenizer model {found:?} is not supported; expected BPE (byte-level like GPT-2, \
         or SentencePiece-style with byte_fallback)"
    )]
    UnsupportedModel {
        /// The tokenizer.json.
        path: PathBuf,
        /// The `model.type` found.
        found: String,
    },
    /// HF `tokenizers` refused to load or run a tokenizer.
    #[error("HF tokenizers failed on {what}: {source}")]
    Tokenizers {
        /// The file or step that failed.
        what: String,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
    /// A token id in tokenizer.json is not below config.json's `vocab_size`.
    #[error("{path}: token id {id} is not below vocab_size {vocab_size}")]
    VocabSizeTooSmall {
        /// The tokenizer.json.
        path: PathBuf,
        /// The largest token id found.
        id: u32,
        /// The vocab size asked for.
        vocab_size: usize,
    },
    /// The chktxt hash is not in llama.cpp's table, so the converter would refuse this tokenizer.
    #[error(
        "BPE pre-tokenizer not recognized: chktxt hash {hash} is not in llama.cpp's \
         get_vocab_base_pre table"
    )]
    UnknownPreTokenizerHash {
        /// The sha256 of the chktxt token ids.
        hash: String,
    },
    /// A required GGUF key is missing.
    #[error("GGUF key {key} is missing")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A GGUF key holds a value of the wrong type.
    #[error("GGUF key {key}: expected {expected}, found {found}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// The type expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// A per-token array does not have one entry per token.
    #[error("{key} has {found} entries, expected {expected} (one per token)")]
    LengthMismatch {
        /// The key of the array.
        key: &'static str,
        /// Its length.
        found: usize,
        /// The number of tokens.
        expected: usize,
    },
    /// `tokenizer.ggml.model` is neither `gpt2` nor `llama`.
    #[error("tokenizer model {0:?} is not supported; expected \"gpt2\" or \"llama\"")]
    UnsupportedGgufModel(String),
    /// A `gpt2` model's pre-tokenizer has no HF equivalent here.
    #[error("pre-tokenizer {name:?} has no HF tokenizer.json mapping; supported: {supported}")]
    UnsupportedPre {
        /// The `tokenizer.ggml.pre` value (empty when absent).
        name: String,
        /// The supported names, comma separated.
        supported: String,
    },
    /// A `llama` model has neither merges nor scores that order them.
    #[error(
        "llama model without tokenizer.ggml.merges and without distinct tokenizer.ggml.scores: \
         the BPE merge order cannot be recovered"
    )]
    NoMergeOrder,
    /// A special token id points past the token list.
    #[error("{key} is {id}, past the {n_tokens} tokens")]
    SpecialIdOutOfRange {
        /// The key.
        key: &'static str,
        /// The id.
        id: u32,
        /// The number of tokens.
        n_tokens: usize,
    },
}

/// Tokenizer metadata as llama.cpp's converter writes it to GGUF.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's pre-tokenizer name (`smollm`, `llama-bpe`, `qwen2`, ...);
    /// `default` for `llama` models, as `_set_vocab_llama_hf` writes.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, by id (see [`token_type`]).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, by id (`llama` models only).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges`, in rank order, each `"left right"`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template` (the default template when the HF config lists several).
    pub chat_template: Option<String>,
}

impl Vocab {
    /// Whether llama.cpp adds BOS: the key when present, else its default for this model and
    /// pre-tokenizer (true for SentencePiece and Llama 3 style BPE).
    pub fn effective_add_bos(&self) -> bool {
        self.add_bos.unwrap_or_else(|| {
            self.model == "llama"
                || matches!(
                    self.pre.as_deref(),
                    Some("llama-bpe" | "llama3" | "llama-v3" | "tekken" | "chameleon")
                )
        })
    }

    /// Whether llama.cpp adds EOS: the key when present, else false.
    pub fn effective_add_eos(&self) -> bool {
        self.add_eos.unwrap_or(false)
    }
}

/// A merge split as llama.cpp splits it: at the first space after the first byte.
fn split_merge(merge: &str) -> (&str, &str) {
    // A space byte is never inside a multi-byte character, so both slices fall on boundaries.
    match merge.bytes().skip(1).position(|b| b == b' ') {
        Some(at) => (&merge[..at + 1], &merge[at + 2..]),
        None => (merge, ""),
    }
}

fn check_len(key: &'static str, found: usize, expected: usize) -> Result<(), VocabError> {
    if found == expected {
        Ok(())
    } else {
        Err(VocabError::LengthMismatch {
            key,
            found,
            expected,
        })
    }
}

#[cfg(test)]
mod tests;
