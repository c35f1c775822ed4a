//! A `tokenizer.json` and `tokenizer_config.json` built from the GGUF tokenizer metadata, that HF
//! `tokenizers` loads and that tokenize like the tokenizer the metadata was converted from.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};
use tokenizers::Tokenizer;

use super::token_type::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};
use super::{
    check_len, split_merge, Vocab, VocabError, KEY_SCORES, KEY_TOKEN_TYPE, SPIECE_UNDERLINE,
};

/// Llama 3's split regex, as in its tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex, as in its tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names of `gpt2` models that [`Vocab::to_tokenizer_json`] can turn back into an HF config.
pub const SUPPORTED_GPT2_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "gpt-2",
    "gpt2",
    "phi-2",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
];

impl Vocab {
    /// A `tokenizer.json` that HF `tokenizers` loads and that tokenizes like the tokenizer this
    /// vocabulary was converted from. Reading it back with [`Vocab::from_hf_files`] (with the file of
    /// [`Vocab::to_tokenizer_config_json`]) gives the same tokens, types, merges and special ids.
    ///
    /// A `llama` model without merges gets them from its scores, as HF's `LlamaConverter` does.
    pub fn to_tokenizer_json(&self) -> Result<Json, VocabError> {
        check_len(KEY_TOKEN_TYPE, self.token_types.len(), self.tokens.len())?;
        if let Some(scores) = &self.scores {
            check_len(KEY_SCORES, scores.len(), self.tokens.len())?;
        }
        let llama = match self.model.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => return Err(VocabError::UnsupportedGgufModel(other.to_string())),
        };
        let in_model_vocab = |id: usize| {
            let t = self.token_types[id];
            t != USER_DEFINED && !(t == UNUSED && is_pad_slot(&self.tokens[id]))
        };
        let mut vocab = Map::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if in_model_vocab(id) && !vocab.contains_key(token) {
                vocab.insert(token.clone(), json!(id));
            }
        }
        let merges: Vec<Json> = if llama && self.merges.is_empty() {
            self.merges_from_scores()?
                .into_iter()
                .map(|(l, r)| json!([l, r]))
                .collect()
        } else {
            self.merges
                .iter()
                .map(|m| {
                    let (l, r) = split_merge(m);
                    json!([l, r])
                })
                .collect()
        };
        let added = self.added_tokens_json();
        if llama {
            Ok(self.llama_tokenizer_json(added, vocab, merges))
        } else {
            self.gpt2_tokenizer_json(added, vocab, merges)
        }
    }

    /// A `tokenizer_config.json` to go with [`Vocab::to_tokenizer_json`]: special tokens, whether
    /// BOS/EOS are added, the chat template; no `model_max_length`.
    pub fn to_tokenizer_config_json(&self) -> Json {
        let content = |id: Option<u32>| -> Json {
            id.and_then(|i| self.tokens.get(i as usize))
                .map_or(Json::Null, |t| json!(t))
        };
        let mut decoder = Map::new();
        for (id, token, special) in self.added_tokens() {
            decoder.insert(
                id.to_string(),
                json!({
                    "content": token,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": special,
                }),
            );
        }
        let mut cfg = Map::new();
        cfg.insert("add_bos_token".into(), json!(self.effective_add_bos()));
        cfg.insert("add_eos_token".into(), json!(self.effective_add_eos()));
        // transformers rebuilds a Llama tokenizer from the slow one when it sees add_prefix_space,
        // so only byte-level models carry it; a llama model's normalizer already says it.
        if let (Some(flag), "gpt2") = (self.add_space_prefix, self.model.as_str()) {
            cfg.insert("add_prefix_space".into(), json!(flag));
        }
        cfg.insert("added_tokens_decoder".into(), Json::Object(decoder));
        cfg.insert("bos_token".into(), content(self.bos_id));
        if let Some(template) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(template));
        }
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        cfg.insert("eos_token".into(), content(self.eos_id));
        cfg.insert("pad_token".into(), content(self.pad_id));
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("unk_token".into(), content(self.unk_id));
        Json::Object(cfg)
    }

    /// The HF tokenizer built from [`Vocab::to_tokenizer_json`].
    pub fn hf_tokenizer(&self) -> Result<Tokenizer, VocabError> {
        let text = self.to_tokenizer_json()?.to_string();
        Tokenizer::from_str(&text).map_err(|source| VocabError::Tokenizers {
            what: "the tokenizer.json built from GGUF metadata".into(),
            source,
        })
    }

    /// Added tokens by id: control and unknown tokens (special), user-defined ones (not special),
    /// and whatever the special ids point at, so that `SpecialVocab` finds them by content.
    fn added_tokens(&self) -> Vec<(usize, &str, bool)> {
        let special_ids: HashSet<usize> = [self.bos_id, self.eos_id, self.unk_id, self.pad_id]
            .into_iter()
            .flatten()
            .map(|id| id as usize)
            .collect();
        self.tokens
            .iter()
            .enumerate()
            .filter_map(|(id, token)| match self.token_types[id] {
                CONTROL | UNKNOWN => Some((id, token.as_str(), true)),
                USER_DEFINED => Some((id, token.as_str(), false)),
                _ if special_ids.contains(&id) => Some((id, token.as_str(), true)),
                _ => None,
            })
            .collect()
    }

    fn added_tokens_json(&self) -> Vec<Json> {
        self.added_tokens()
            .into_iter()
            .map(|(id, token, special)| {
                json!({
                    "id": id,
                    "content": token,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                })
            })
            .collect()
    }

    /// HF post-processor adding BOS/EOS as llama.cpp would, or `otherwise` when it adds neither.
    fn post_processor(&self, otherwise: Json) -> Json {
        let token = |add: bool, id: Option<u32>| {
            id.filter(|_| add)
                .and_then(|i| self.tokens.get(i as usize).map(|t| (i, t.as_str())))
        };
        let bos = token(self.effective_add_bos(), self.bos_id);
        let eos = token(self.effective_add_eos(), self.eos_id);
        if bos.is_none() && eos.is_none() {
            return otherwise;
        }
        let piece = |(_, t): (u32, &str), type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let mut single = Vec::new();
        let mut pair = Vec::new();
        for (seq, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
            if let Some(b) = bos {
                out.push(piece(b, type_id));
            }
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = eos {
                out.push(piece(e, type_id));
            }
        }
        let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
        let mut special_tokens = Map::new();
        for (id, t) in [bos, eos].into_iter().flatten() {
            special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special_tokens,
        })
    }

    fn llama_tokenizer_json(
        &self,
        added: Vec<Json>,
        vocab: Map<String, Json>,
        merges: Vec<Json>,
    ) -> Json {
        let prefix = self.add_space_prefix.unwrap_or(true);
        let unk = self
            .unk_id
            .map(|i| i as usize)
            .or_else(|| self.token_types.iter().position(|&t| t == UNKNOWN))
            .map_or(Json::Null, |i| json!(self.tokens[i]));
        let mut normalizers = Vec::new();
        if prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": SPIECE_UNDERLINE}));
        }
        normalizers.push(
            json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}),
        );
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": self.post_processor(Json::Null),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        })
    }

    fn gpt2_tokenizer_json(
        &self,
        added: Vec<Json>,
        vocab: Map<String, Json>,
        merges: Vec<Json>,
    ) -> Result<Json, VocabError> {
        let pre = self.pre.as_deref().unwrap_or("");
        let byte_level = |trim_offsets: bool, use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "smollm" | "starcoder" | "refact" => (
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true, true),
                ]}),
                false,
            ),
            "gpt-2" | "gpt2" | "phi-2" => (Json::Null, byte_level(true, true), false),
            "llama-bpe" | "llama3" | "llama-v3" => (
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT_REGEX), byte_level(true, false)]}),
                true,
            ),
            "qwen2" | "deepseek-r1-qwen" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT_REGEX), byte_level(false, false)]}),
                false,
            ),
            _ => {
                return Err(VocabError::UnsupportedPre {
                    name: pre.to_string(),
                    supported: SUPPORTED_GPT2_PRE.join(", "),
                })
            }
        };
        let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post = match self.post_processor(Json::Null) {
            Json::Null => byte_level_post,
            template => json!({"type": "Sequence", "processors": [byte_level_post, template]}),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": ignore_merges,
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// Merges from scores, as transformers' `generate_merges(vocab, vocab_scores)` does for
    /// SentencePiece models: every split of a token into two vocabulary pieces, highest score first.
    pub(super) fn merges_from_scores(&self) -> Result<Vec<(String, String)>, VocabError> {
        let scores = self.scores.as_ref().ok_or(VocabError::NoMergeOrder)?;
        let pieces: Vec<usize> = (0..self.tokens.len())
            .filter(|&id| matches!(self.token_types[id], NORMAL | BYTE | UNKNOWN | CONTROL))
            .collect();
        let first = pieces.first().map(|&id| scores[id]);
        if pieces.iter().all(|&id| Some(scores[id]) == first) {
            return Err(VocabError::NoMergeOrder);
        }
        let mut vocab: HashMap<&str, usize> = HashMap::new();
        for &id in &pieces {
            vocab.entry(self.tokens[id].as_str()).or_insert(id);
        }
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        for &id in &pieces {
            let token = self.tokens[id].as_str();
            let mut local: Vec<(&str, &str, f32)> = token
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (l, r) = token.split_at(at);
                    (vocab.contains_key(l) && vocab.contains_key(r)).then_some((l, r, scores[id]))
                })
                .collect();
            local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
            merges.extend(local);
        }
        let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
        // Stable and descending, as Python's sorted(..., reverse=True).
        merges.sort_by(|a, b| {
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0)
                .then(kb.1.cmp(&ka.1))
                .then(kb.2.cmp(&ka.2))
        });
        Ok(merges
            .into_iter()
            .map(|(l, r, _)| (l.to_string(), r.to_string()))
            .collect())
    }
}

/// A `[PAD{n}]` slot the converter fills where a tokenizer has no token.
pub(super) fn is_pad_slot(token: &str) -> bool {
    token
        .strip_prefix("[PAD")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
