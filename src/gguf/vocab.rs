//! Tokenizer metadata both ways: an HF `tokenizer.json` (+ `tokenizer_config.json`) becomes the GGUF
//! `tokenizer.*` keys exactly as llama.cpp's `convert_hf_to_gguf.py` writes them, and those keys become a
//! `tokenizer.json` that HF `tokenizers` loads and that tokenizes like the original.
//! Keys: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer>
//!
//! Two tokenizer families are handled, as the converter names them in `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE (`_set_vocab_gpt2` / `get_vocab_base`); the pre-tokenizer is identified by
//!   hashing the tokenization of [`CHKTXT`] (`get_vocab_base_pre`).
//! - `llama`: SentencePiece-style BPE with byte fallback (`_set_vocab_llama_hf` / `LlamaHfVocab`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use tokenizers::{Model, Tokenizer};

use super::value::Value;

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
use token_type::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};

/// Score the converter gives added and padding tokens (`_create_vocab_sentencepiece`, `LlamaHfVocab`).
const ADDED_TOKEN_SCORE: f32 = -1000.0;

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// The text `get_vocab_base_pre` in llama.cpp's `convert_hf_to_gguf.py` tokenizes; the sha256 of the
/// Python `str()` of its token ids names the pre-tokenizer.
pub const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1F680} (normal) \
\u{1F636}\u{200D}\u{1F32B}\u{FE0F} (multiple emojis concatenated) \u{2705} \u{1F999}\u{1F999} \
3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \
\u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}\u{1F601} \
?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= \
\u{43D}\u{435}\u{449}\u{43E} \u{43D}\u{430} \u{411}\u{44A}\u{43B}\u{433}\u{430}\u{440}\u{441}\u{43A}\u{438} \
''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make \
it, 'D you like some tea? We'Ve a'lL";

/// `get_vocab_base_pre`'s table (llama.cpp `convert_hf_to_gguf.py`, in its order): chktxt hash -> pre name.
/// A hash listed twice takes its later name, as the chain of `if`s there does.
#[rustfmt::skip]
const PRE_TOKENIZER_HASHES: &[(&str, &str)] = &[
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe"),
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe"),
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4"),
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4"),
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4"),
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"),
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan"),
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense"),
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2"),
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"),
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "bert-bge"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "mpt"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en"),
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es"),
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de"),
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"),
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code"),
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"),
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"),
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2"),
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"),
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon"),
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe"),
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"),
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"),
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"),
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert"),
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe"),
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2"),
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling"),
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"),
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"),
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu"),
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open"),
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm"),
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"),
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"),
];

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
    /// Reads an HF tokenizer as `convert_hf_to_gguf.py` does for a model whose `config.json` says
    /// `vocab_size`: token ids past the tokenizer's are padded with `[PAD{id}]` tokens of type unused.
    ///
    /// A BPE `tokenizer.json` with `byte_fallback` and a `Sequence` decoder is read as `LlamaHfVocab`
    /// does (model `llama`); any other BPE as `get_vocab_base` does (model `gpt2`, pre-tokenizer found
    /// by [`detect_pre_tokenizer`]). Special token ids, `add_bos`/`add_eos` and the chat template
    /// follow gguf-py's `SpecialVocab`, which reads a `chat_template.jinja` or `chat_template.json`
    /// beside `tokenizer_config.json` when that file has no `chat_template`.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
        vocab_size: usize,
    ) -> Result<Vocab, VocabError> {
        from_hf_files_with(
            tokenizer_json,
            tokenizer_config_json,
            vocab_size,
            &detect_pre_tokenizer,
        )
    }

    /// Fills the special token ids still unset from `config.json`'s `{bos,eos,unk,pad}_token_id`
    /// (or its `text_config`), as `SpecialVocab._try_load_from_config_json` does after the tokenizer
    /// files. Ids that are not integers (a list of EOS ids) or not below the token count are skipped.
    pub fn fill_special_ids_from_config_json(&mut self, config_json: &Json) {
        let n_tokens = self.tokens.len();
        let lookup = |typ: &str| -> Option<u32> {
            let key = format!("{typ}_token_id");
            let v = config_json
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| config_json.get("text_config").and_then(|t| t.get(&key)))?;
            let id = u32::try_from(v.as_u64()?).ok()?;
            ((id as usize) < n_tokens).then_some(id)
        };
        for (slot, typ) in [
            (&mut self.bos_id, "bos"),
            (&mut self.eos_id, "eos"),
            (&mut self.unk_id, "unk"),
            (&mut self.pad_id, "pad"),
        ] {
            if slot.is_none() {
                *slot = lookup(typ);
            }
        }
    }

    /// The GGUF key-values, in the order gguf-py writes them; unset options are left out.
    pub fn to_gguf_kvs(&self) -> Vec<(String, Value)> {
        let mut kvs = vec![(KEY_MODEL.to_string(), Value::String(self.model.clone()))];
        if let Some(pre) = &self.pre {
            kvs.push((KEY_PRE.to_string(), Value::String(pre.clone())));
        }
        kvs.push((
            KEY_TOKENS.to_string(),
            Value::strings(self.tokens.iter().cloned()),
        ));
        if let Some(scores) = &self.scores {
            kvs.push((KEY_SCORES.to_string(), Value::f32s(scores.iter().copied())));
        }
        kvs.push((
            KEY_TOKEN_TYPE.to_string(),
            Value::i32s(self.token_types.iter().copied()),
        ));
        if !self.merges.is_empty() {
            kvs.push((
                KEY_MERGES.to_string(),
                Value::strings(self.merges.iter().cloned()),
            ));
        }
        for (key, id) in [
            (KEY_BOS_ID, self.bos_id),
            (KEY_EOS_ID, self.eos_id),
            (KEY_UNK_ID, self.unk_id),
            (KEY_PAD_ID, self.pad_id),
        ] {
            if let Some(id) = id {
                kvs.push((key.to_string(), Value::U32(id)));
            }
        }
        for (key, flag) in [
            (KEY_ADD_BOS, self.add_bos),
            (KEY_ADD_EOS, self.add_eos),
            (KEY_ADD_SPACE_PREFIX, self.add_space_prefix),
        ] {
            if let Some(flag) = flag {
                kvs.push((key.to_string(), Value::Bool(flag)));
            }
        }
        if let Some(template) = &self.chat_template {
            kvs.push((
                KEY_CHAT_TEMPLATE.to_string(),
                Value::String(template.clone()),
            ));
        }
        kvs
    }

    /// Reads the tokenizer keys of a GGUF through `get` (key -> value). Token types default to
    /// normal when absent, as llama.cpp does.
    pub fn from_gguf(get: &dyn Fn(&str) -> Option<Value>) -> Result<Vocab, VocabError> {
        let model = match get(KEY_MODEL) {
            Some(v) => gguf_string(KEY_MODEL, v)?,
            None => return Err(VocabError::MissingKey { key: KEY_MODEL }),
        };
        let pre = get(KEY_PRE).map(|v| gguf_string(KEY_PRE, v)).transpose()?;
        let tokens = match get(KEY_TOKENS) {
            Some(v) => gguf_array(KEY_TOKENS, &v, "array of strings", |e| {
                e.as_str().map(str::to_string)
            })?,
            None => return Err(VocabError::MissingKey { key: KEY_TOKENS }),
        };
        let n = tokens.len();
        let token_types = match get(KEY_TOKEN_TYPE) {
            Some(v) => gguf_array(KEY_TOKEN_TYPE, &v, "array of i32", |e| match *e {
                Value::I32(t) => Some(t),
                _ => e.as_u64().and_then(|t| i32::try_from(t).ok()),
            })?,
            None => vec![NORMAL; n],
        };
        check_len(KEY_TOKEN_TYPE, token_types.len(), n)?;
        let scores = get(KEY_SCORES)
            .map(|v| {
                gguf_array(KEY_SCORES, &v, "array of f32", |e| match *e {
                    Value::F32(s) => Some(s),
                    Value::I32(s) => Some(s as f32),
                    _ => None,
                })
            })
            .transpose()?;
        if let Some(s) = &scores {
            check_len(KEY_SCORES, s.len(), n)?;
        }
        let merges = get(KEY_MERGES)
            .map(|v| {
                gguf_array(KEY_MERGES, &v, "array of strings", |e| {
                    e.as_str().map(str::to_string)
                })
            })
            .transpose()?
            .unwrap_or_default();
        let id = |key: &'static str| -> Result<Option<u32>, VocabError> {
            let Some(v) = get(key) else { return Ok(None) };
            let id = v
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| VocabError::WrongType {
                    key,
                    expected: "u32 token id",
                    found: format!("{v:?}"),
                })?;
            if id as usize >= n {
                return Err(VocabError::SpecialIdOutOfRange {
                    key,
                    id,
                    n_tokens: n,
                });
            }
            Ok(Some(id))
        };
        let flag = |key: &'static str| -> Result<Option<bool>, VocabError> {
            get(key)
                .map(|v| {
                    v.as_bool().ok_or_else(|| VocabError::WrongType {
                        key,
                        expected: "bool",
                        found: format!("{v:?}"),
                    })
                })
                .transpose()
        };
        Ok(Vocab {
            model,
            pre,
            tokens,
            token_types,
            scores,
            merges,
            bos_id: id(KEY_BOS_ID)?,
            eos_id: id(KEY_EOS_ID)?,
            unk_id: id(KEY_UNK_ID)?,
            pad_id: id(KEY_PAD_ID)?,
            add_bos: flag(KEY_ADD_BOS)?,
            add_eos: flag(KEY_ADD_EOS)?,
            add_space_prefix: flag(KEY_ADD_SPACE_PREFIX)?,
            chat_template: get(KEY_CHAT_TEMPLATE)
                .map(|v| gguf_string(KEY_CHAT_TEMPLATE, v))
                .transpose()?,
        })
    }

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
    fn merges_from_scores(&self) -> Result<Vec<(String, String)>, VocabError> {
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

/// The sha256 (hex) of the Python `str()` of `tok`'s ids for [`CHKTXT`], special tokens added as
/// the HF tokenizer's post-processor does by default.
pub fn chktxt_hash(tok: &Tokenizer) -> Result<String, VocabError> {
    let encoding = tok
        .encode(CHKTXT, true)
        .map_err(|source| VocabError::Tokenizers {
            what: "encoding chktxt".into(),
            source,
        })?;
    let ids: Vec<String> = encoding.get_ids().iter().map(u32::to_string).collect();
    let text = format!("[{}]", ids.join(", "));
    Ok(Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// llama.cpp's pre-tokenizer name for a BPE tokenizer, by the hash of its chktxt tokenization
/// (`get_vocab_base_pre`). An unknown hash is an error naming it, as the converter refuses it.
pub fn detect_pre_tokenizer(tok: &Tokenizer) -> Result<String, VocabError> {
    let hash = chktxt_hash(tok)?;
    PRE_TOKENIZER_HASHES
        .iter()
        .rev()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| name.to_string())
        .ok_or(VocabError::UnknownPreTokenizerHash { hash })
}

type PreDetector<'a> = &'a dyn Fn(&Tokenizer) -> Result<String, VocabError>;

fn from_hf_files_with(
    tokenizer_json: &Path,
    tokenizer_config_json: Option<&Path>,
    vocab_size: usize,
    detect: PreDetector,
) -> Result<Vocab, VocabError> {
    let (text, tj) = read_json(tokenizer_json)?;
    let config = match tokenizer_config_json {
        Some(path) => {
            let (_, config) = read_json(path)?;
            if !config.is_object() {
                return Err(malformed(path, "a JSON object"));
            }
            Some(config)
        }
        None => None,
    };
    let model = tj
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| malformed(tokenizer_json, "a \"model\" object"))?;
    let model_type = match model.get("type").and_then(Json::as_str) {
        Some(t) => t,
        // Files from before tokenizers wrote the type: a BPE model is the one with merges.
        None if model.get("merges").is_some() => "BPE",
        None => "unknown",
    };
    if model_type != "BPE" {
        return Err(VocabError::UnsupportedModel {
            path: tokenizer_json.to_path_buf(),
            found: model_type.to_string(),
        });
    }
    let tok = Tokenizer::from_str(&text).map_err(|source| VocabError::Tokenizers {
        what: tokenizer_json.display().to_string(),
        source,
    })?;
    let merges = hf_merges(model, tokenizer_json)?;
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let sequence_decoder = tj.pointer("/decoder/type").and_then(Json::as_str) == Some("Sequence");
    let llama = byte_fallback && sequence_decoder;

    let (tokens, token_types, scores, pre) = if llama {
        let (tokens, types, scores) = llama_hf_tokens(
            &tok,
            model,
            config.as_ref(),
            &merges,
            tokenizer_json,
            vocab_size,
        )?;
        (tokens, types, Some(scores), Some("default".to_string()))
    } else {
        let (tokens, types) = gpt2_tokens(&tok, tokenizer_json, vocab_size)?;
        (tokens, types, None, Some(detect(&tok)?))
    };
    // SpecialVocab gets n_vocab only from _set_vocab_llama_hf.
    let n_vocab = llama.then_some(tokens.len());
    let config_dir = tokenizer_config_json.and_then(Path::parent);
    let specials = special_vocab(&tj, config.as_ref(), config_dir, n_vocab)?;

    // LlamaModel.set_vocab copies tokenizer_config's add_prefix_space; a SentencePiece-style
    // tokenizer without a prepended "▁" says the same by its normalizer.
    let add_space_prefix = config
        .as_ref()
        .and_then(|c| c.get("add_prefix_space"))
        .and_then(Json::as_bool)
        .or_else(|| (llama && !prepends_space(&tj)).then_some(false));

    Ok(Vocab {
        model: if llama { "llama" } else { "gpt2" }.to_string(),
        pre,
        tokens,
        token_types,
        scores,
        merges,
        bos_id: specials.bos,
        eos_id: specials.eos,
        unk_id: specials.unk,
        pad_id: specials.pad,
        add_bos: specials.add_bos,
        add_eos: specials.add_eos,
        add_space_prefix,
        chat_template: specials.chat_template,
    })
}

/// `get_vocab_base`: ids by the full vocabulary (added tokens included), padded to `vocab_size`.
fn gpt2_tokens(
    tok: &Tokenizer,
    path: &Path,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>), VocabError> {
    let vocab = tok.get_vocab(true);
    check_vocab_size(vocab.values().copied().max(), path, vocab_size)?;
    let reverse: HashMap<u32, &str> = vocab.iter().map(|(t, &id)| (id, t.as_str())).collect();
    let added = tok.get_added_tokens_decoder();
    let added_by_content: HashMap<&str, &tokenizers::AddedToken> =
        added.values().map(|a| (a.content.as_str(), a)).collect();

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let Some(&text) = u32::try_from(id).ok().and_then(|i| reverse.get(&i)) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(UNUSED);
            continue;
        };
        let Some(added_token) = added_by_content.get(text) else {
            tokens.push(text.to_string());
            types.push(NORMAL);
            continue;
        };
        let added_token = added.get(&(id as u32)).unwrap_or(added_token);
        let mut token = text.to_string();
        if !added_token.normalized {
            // llama.cpp expects control and user-defined tokens pre-normalized.
            token = roundtrip_text(tok, &token)?;
        }
        if added_token.special || looks_special(&token) {
            types.push(CONTROL);
        } else {
            token = token.replace(SPIECE_UNDERLINE, " ");
            types.push(USER_DEFINED);
        }
        tokens.push(token);
    }
    Ok((tokens, types))
}

/// Tokens, token types and scores, by id.
type LlamaTokens = (Vec<String>, Vec<i32>, Vec<f32>);

/// `LlamaHfVocab`, without its assumption that ids are contiguous: tokens of the BPE model are byte,
/// control (special ids), or normal; added tokens outside it are control or user-defined.
///
/// Two departures, both so that llama.cpp tokenizes as HF does: the model's `unk_token` is typed
/// unknown (the converter makes it control), and scores follow merge rank (the first merge producing
/// a token gives it `-rank`; other pieces rank after every merge) where the converter writes -1000
/// for all, which leaves llama.cpp's SentencePiece merging no order.
fn llama_hf_tokens(
    tok: &Tokenizer,
    model: &Json,
    config: Option<&Json>,
    merges: &[String],
    path: &Path,
    vocab_size: usize,
) -> Result<LlamaTokens, VocabError> {
    let model_vocab = tok.get_model().get_vocab();
    let reverse: HashMap<u32, &str> = model_vocab
        .iter()
        .map(|(t, &id)| (id, t.as_str()))
        .collect();
    let added = tok.get_added_tokens_decoder();
    let max_id = model_vocab.values().chain(added.keys()).copied().max();
    check_vocab_size(max_id, path, vocab_size)?;

    let mut special_ids: HashSet<u32> = added
        .iter()
        .filter(|(_, a)| a.special)
        .map(|(&id, _)| id)
        .collect();
    if let Some(config) = config {
        let mut names: Vec<&Json> = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
            .iter()
            .filter_map(|typ| config.get(format!("{typ}_token")))
            .collect();
        if let Some(Json::Array(extra)) = config.get("additional_special_tokens") {
            names.extend(extra);
        }
        special_ids.extend(
            names
                .into_iter()
                .filter_map(token_content)
                .filter_map(|c| tok.token_to_id(c)),
        );
    }
    let unk = model.get("unk_token").and_then(Json::as_str);
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (rank, merge) in merges.iter().enumerate() {
        let (l, r) = split_merge(merge);
        first_rank.entry(format!("{l}{r}")).or_insert(rank);
    }
    let n_merges = merges.len();

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    let mut scores = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let id32 = id as u32;
        let in_model = reverse.get(&id32).copied();
        match (added.get(&id32), in_model) {
            (Some(a), m) if m != Some(a.content.as_str()) => {
                tokens.push(a.content.clone());
                types.push(if special_ids.contains(&id32) {
                    CONTROL
                } else {
                    USER_DEFINED
                });
                scores.push(ADDED_TOKEN_SCORE);
            }
            (_, Some(text)) => {
                let ty = if is_byte_token(text) {
                    BYTE
                } else if Some(text) == unk {
                    UNKNOWN
                } else if special_ids.contains(&id32) {
                    CONTROL
                } else {
                    NORMAL
                };
                let score = match first_rank.get(text) {
                    Some(&rank) => 0.0 - rank as f32,
                    None => 0.0 - (n_merges + id) as f32,
                };
                tokens.push(text.to_string());
                types.push(ty);
                scores.push(score);
            }
            _ => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
                scores.push(ADDED_TOKEN_SCORE);
            }
        }
    }
    Ok((tokens, types, scores))
}

/// What gguf-py's `SpecialVocab` takes from tokenizer.json and tokenizer_config.json.
#[derive(Debug, Default)]
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    chat_template: Option<String>,
}

/// `SpecialVocab._try_load_from_tokenizer_json`, kept to what the GGUF keys here need. Values are
/// compared as JSON, as Python compares them: a config's `{"content": ...}` token is not equal to
/// the plain string of a post-processor template.
fn special_vocab(
    tj: &Json,
    config: Option<&Json>,
    config_dir: Option<&Path>,
    n_vocab: Option<usize>,
) -> Result<Specials, VocabError> {
    let mut cfg: Option<Map<String, Json>> = config.and_then(|c| c.as_object().cloned());
    let has_cfg = cfg.as_ref().is_some_and(|m| !m.is_empty());
    let cfg_get = |cfg: &Option<Map<String, Json>>, key: &str| {
        cfg.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or(Json::Null)
    };
    let mut special_bos = cfg_get(&cfg, "bos_token");
    let special_cls = cfg_get(&cfg, "cls_token");
    let mut special_eos = cfg_get(&cfg, "eos_token");
    let special_sep = cfg_get(&cfg, "sep_token");
    if let Some(m) = cfg.as_mut().filter(|_| has_cfg) {
        if !truthy(&special_bos) && truthy(&special_cls) {
            m.insert("bos_token".into(), special_cls.clone());
            special_bos = special_cls.clone();
        }
        if !truthy(&special_eos) && truthy(&special_sep) {
            m.insert("eos_token".into(), special_sep.clone());
            special_eos = special_sep;
        }
    }

    let mut out = Specials::default();
    if let Some(post) = tj.get("post_processor").filter(|p| truthy(p)) {
        let processors: Vec<&Json> = match post.get("processors") {
            Some(Json::Array(list)) => list.iter().collect(),
            _ => vec![post],
        };
        for processor in processors {
            match processor.get("type").and_then(Json::as_str) {
                Some("RobertaProcessing") => {
                    out.add_bos = Some(true);
                    out.add_eos = Some(true);
                }
                Some("TemplateProcessing") => {
                    let single = processor
                        .get("single")
                        .and_then(Json::as_array)
                        .map_or(&[][..], Vec::as_slice);
                    if single.len() <= 1 {
                        continue;
                    }
                    let special_id = |piece: &Json| {
                        piece
                            .pointer("/SpecialToken/id")
                            .filter(|id| truthy(id))
                            .cloned()
                    };
                    if let Some(first) = special_id(&single[0]) {
                        if !has_cfg {
                            special_bos = first.clone();
                        }
                        out.add_bos = Some(first == special_bos || first == special_cls);
                    }
                    if let Some(last) = special_id(&single[single.len() - 1]) {
                        if !has_cfg {
                            special_eos = last.clone();
                        } else if last != special_eos {
                            // The converter moves the config's EOS to EOT and takes the template's.
                            if let Some(m) = cfg.as_mut() {
                                m.insert("eos_token".into(), last.clone());
                            }
                            special_eos = last.clone();
                        }
                        out.add_eos = Some(last == special_eos);
                    }
                }
                _ => {}
            }
        }
    }
    let Some(cfg) = cfg.filter(|_| has_cfg) else {
        return Ok(out);
    };

    let template = match cfg.get("chat_template") {
        Some(t) => t.clone(),
        None => chat_template_beside(config_dir)?.unwrap_or(Json::Null),
    };
    out.chat_template = match template {
        Json::String(s) => Some(s),
        Json::Array(list) => list.iter().find_map(|choice| {
            let name: String = choice
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or("")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let template = choice.get("template").and_then(Json::as_str)?;
            (name == "default").then(|| template.to_string())
        }),
        _ => None,
    };

    let added_tokens = tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .map_or(&[][..], Vec::as_slice);
    let n_vocab = n_vocab.unwrap_or(usize::MAX);
    for typ in ["bos", "eos", "unk", "pad"] {
        let add = cfg.get(&format!("add_{typ}_token")).and_then(Json::as_bool);
        match (typ, add) {
            ("bos", Some(b)) => out.add_bos = Some(b),
            ("eos", Some(b)) => out.add_eos = Some(b),
            _ => {}
        }
        let Some(content) = cfg.get(&format!("{typ}_token")).and_then(token_content) else {
            continue;
        };
        let id = added_tokens
            .iter()
            .find(|a| a.get("content").and_then(Json::as_str) == Some(content))
            .and_then(|a| a.get("id"))
            .and_then(Json::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| (id as usize) < n_vocab);
        let slot = match typ {
            "bos" => &mut out.bos,
            "eos" => &mut out.eos,
            "unk" => &mut out.unk,
            _ => &mut out.pad,
        };
        *slot = id;
    }
    Ok(out)
}

/// The chat template of `chat_template.jinja`, else of `chat_template.json`, in `dir`.
fn chat_template_beside(dir: Option<&Path>) -> Result<Option<Json>, VocabError> {
    let Some(dir) = dir else { return Ok(None) };
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| VocabError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some(Json::String(text)));
    }
    let json_path = dir.join("chat_template.json");
    if json_path.is_file() {
        let (_, value) = read_json(&json_path)?;
        return Ok(value.get("chat_template").cloned());
    }
    Ok(None)
}

/// The merges of a tokenizer.json BPE model as gguf-py writes them: `"a b"`, with spaces inside
/// the pieces of the newer `[a, b]` form written as U+0120.
fn hf_merges(model: &Json, path: &Path) -> Result<Vec<String>, VocabError> {
    let Some(list) = model.get("merges").and_then(Json::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(l), Json::String(r)] => Ok(format!(
                    "{} {}",
                    l.replace(' ', "\u{120}"),
                    r.replace(' ', "\u{120}")
                )),
                _ => Err(malformed(path, "merges as \"a b\" strings or [a, b] pairs")),
            },
            _ => Err(malformed(path, "merges as \"a b\" strings or [a, b] pairs")),
        })
        .collect()
}

/// A merge split as llama.cpp splits it: at the first space after the first byte.
fn split_merge(merge: &str) -> (&str, &str) {
    // A space byte is never inside a multi-byte character, so both slices fall on boundaries.
    match merge.bytes().skip(1).position(|b| b == b' ') {
        Some(at) => (&merge[..at + 1], &merge[at + 2..]),
        None => (merge, ""),
    }
}

/// Whether a tokenizer.json adds SentencePiece's leading "▁" (a Prepend normalizer or a
/// Metaspace pre-tokenizer that prepends).
fn prepends_space(tj: &Json) -> bool {
    fn walk(node: &Json) -> bool {
        match node.get("type").and_then(Json::as_str) {
            Some("Prepend") => true,
            Some("Metaspace") => {
                node.get("add_prefix_space").and_then(Json::as_bool) == Some(true)
                    || matches!(
                        node.get("prepend_scheme").and_then(Json::as_str),
                        Some("first" | "always")
                    )
            }
            Some("Sequence") => ["normalizers", "pretokenizers"]
                .iter()
                .filter_map(|k| node.get(*k).and_then(Json::as_array))
                .flatten()
                .any(walk),
            _ => false,
        }
    }
    ["normalizer", "pre_tokenizer"]
        .iter()
        .filter_map(|k| tj.get(*k))
        .any(walk)
}

/// `does_token_look_special` of the converter: added tokens that some models forget to mark special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{FF5C}") && token.ends_with("\u{FF5C}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// `<0xNN>`, a SentencePiece byte token.
fn is_byte_token(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && b[5] == b'>'
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// A `[PAD{n}]` slot the converter fills where a tokenizer has no token.
fn is_pad_slot(token: &str) -> bool {
    token
        .strip_prefix("[PAD")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A special token of tokenizer_config.json: a string or `{"content": string}`.
fn token_content(entry: &Json) -> Option<&str> {
    match entry {
        Json::String(s) => Some(s),
        Json::Object(m) => m.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// `tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))`.
fn roundtrip_text(tok: &Tokenizer, text: &str) -> Result<String, VocabError> {
    let failed = |source| VocabError::Tokenizers {
        what: format!("re-normalizing added token {text:?}"),
        source,
    };
    let encoding = tok.encode(text, false).map_err(failed)?;
    tok.decode(encoding.get_ids(), false).map_err(failed)
}

/// Python truthiness of a JSON value.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

fn check_vocab_size(max_id: Option<u32>, path: &Path, vocab_size: usize) -> Result<(), VocabError> {
    match max_id {
        Some(id) if id as usize >= vocab_size => Err(VocabError::VocabSizeTooSmall {
            path: path.to_path_buf(),
            id,
            vocab_size,
        }),
        _ => Ok(()),
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

fn read_json(path: &Path) -> Result<(String, Json), VocabError> {
    let text = std::fs::read_to_string(path).map_err(|source| VocabError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value = serde_json::from_str(&text).map_err(|source| VocabError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, value))
}

fn malformed(path: &Path, expected: &str) -> VocabError {
    VocabError::Malformed {
        path: path.to_path_buf(),
        expected: expected.to_string(),
    }
}

fn gguf_string(key: &'static str, v: Value) -> Result<String, VocabError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(VocabError::WrongType {
            key,
            expected: "string",
            found: format!("{:?}", other.value_type()),
        }),
    }
}

fn gguf_array<T>(
    key: &'static str,
    v: &Value,
    expected: &'static str,
    elem: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, VocabError> {
    let wrong = |found: String| VocabError::WrongType {
        key,
        expected,
        found,
    };
    let Value::Array(ty, items) = v else {
        return Err(wrong(format!("{:?}", v.value_type())));
    };
    items
        .iter()
        .map(|e| elem(e).ok_or_else(|| wrong(format!("array of {ty:?}"))))
        .collect()
}

#[cfg(test)]
mod tests;
