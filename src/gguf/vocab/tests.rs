//! Tokenizer metadata: toy GPT-2 and Llama tokenizers read from HF files, written back as a
//! tokenizer.json, through GGUF key-values, and the errors that name what is wrong.

use std::collections::HashMap;
use std::fs;
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::from_hf::{from_hf_files_with, is_byte_token, looks_special};
use super::pre_tokenizer::PRE_TOKENIZER_HASHES;
use super::to_hf::is_pad_slot;
use super::token_type::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};
use super::*;
use crate::gguf::value::{Value, ValueType};

/// GPT-2's byte -> printable char table (`bytes_to_unicode`).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

fn added(id: u32, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// A byte-level BPE with SmolLM's pre-tokenizer: 3 special tokens, the 256 byte chars, 4 merges,
/// one user-defined added token (id 263).
fn toy_gpt2_json() -> Json {
    let mut vocab = Map::new();
    for (i, t) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(i));
    }
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(3 + i));
    }
    for (i, t) in ["Ġt", "he", "Ġthe", "in"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(259 + i));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            added(0, "<|endoftext|>", true), added(1, "<|im_start|>", true),
            added(2, "<|im_end|>", true), added(263, "<think>", false),
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he", "i n"]},
    })
}

fn toy_gpt2_config() -> Json {
    json!({
        "add_prefix_space": false,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": "{{ messages }}",
        "model_max_length": 8192,
    })
}

/// A SentencePiece-style BPE with byte fallback, laid out like Llama 2's tokenizer.json, plus one
/// user-defined added token (id 268).
fn toy_llama_json() -> Json {
    let mut vocab = Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (i, t) in ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁c"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(259 + i));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<unk>", true), added(1, "<s>", true), added(2, "</s>", true),
                         added(268, "<tool>", false)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"], ["b", "c"], ["▁", "c"]]},
    })
}

fn toy_llama_config() -> Json {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}],
    })
}

/// Writes tokenizer.json and (if given) tokenizer_config.json into a fresh folder.
fn write_files(tj: &Json, cfg: Option<&Json>) -> (tempfile::TempDir, PathBuf, Option<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let tj_path = dir.path().join("tokenizer.json");
    fs::write(&tj_path, tj.to_string()).unwrap();
    let cfg_path = cfg.map(|c| {
        let p = dir.path().join("tokenizer_config.json");
        fs::write(&p, c.to_string()).unwrap();
        p
    });
    (dir, tj_path, cfg_path)
}

fn smollm(_: &Tokenizer) -> Result<String, VocabError> {
    Ok("smollm".into())
}

fn load(tj: &Json, cfg: Option<&Json>, vocab_size: usize) -> Vocab {
    let (_dir, tj_path, cfg_path) = write_files(tj, cfg);
    from_hf_files_with(&tj_path, cfg_path.as_deref(), vocab_size, &smollm).unwrap()
}

fn tokenizer(tj: &Json) -> Tokenizer {
    Tokenizer::from_str(&tj.to_string()).unwrap()
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap().get_ids().to_vec()
}

const CHKTXT_SHA256: &str = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da";

const SAMPLES: &[&str] = &[
    "the thing in 2024",
    "<|im_start|>user\nthe <think>in<|im_end|>",
    "ab abc cab  bca\tc",
    "x <tool> ab",
];

#[test]
fn chktxt_is_the_converters_text() {
    // The digest of the constant as verified against SmolLM2's tokenizer (hash "smollm"),
    // so that an edit to the string cannot pass unnoticed.
    let digest: String = Sha256::digest(CHKTXT.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, CHKTXT_SHA256);
    assert_eq!(CHKTXT.chars().filter(|&c| c == '\n').count(), 11);
}

#[test]
fn hash_table_is_well_formed() {
    for (hash, name) in PRE_TOKENIZER_HASHES {
        assert!(
            hash.len() == 64
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!name.is_empty());
    }
    // Later entries win, as in the converter's chain of ifs.
    let lookup = |h: &str| {
        PRE_TOKENIZER_HASHES
            .iter()
            .rev()
            .find(|(k, _)| *k == h)
            .map(|(_, n)| *n)
    };
    assert_eq!(
        lookup("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166"),
        Some("olmo")
    );
    assert_eq!(
        lookup("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f"),
        Some("jina-v2-en")
    );
}

#[test]
fn gpt2_types_ids_merges() {
    let v = load(&toy_gpt2_json(), Some(&toy_gpt2_config()), 266);
    assert_eq!(v.model, "gpt2");
    assert_eq!(v.pre.as_deref(), Some("smollm"));
    assert_eq!(v.tokens.len(), 266);
    assert_eq!(&v.token_types[..4], &[CONTROL, CONTROL, CONTROL, NORMAL]);
    assert_eq!(v.tokens[3 + usize::from(b'!')], "!");
    assert_eq!(v.tokens[261], "Ġthe");
    assert_eq!(
        (v.tokens[263].as_str(), v.token_types[263]),
        ("<think>", USER_DEFINED)
    );
    assert_eq!(&v.tokens[264..], &["[PAD264]", "[PAD265]"]);
    assert_eq!(&v.token_types[264..], &[UNUSED, UNUSED]);
    assert_eq!(v.merges, ["Ġ t", "h e", "Ġt he", "i n"]);
    assert_eq!(
        (v.bos_id, v.eos_id, v.unk_id, v.pad_id),
        (Some(1), Some(2), Some(0), Some(2))
    );
    assert_eq!((v.add_bos, v.add_eos), (None, None));
    assert_eq!(v.add_space_prefix, Some(false));
    assert_eq!(v.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(v.scores, None);
}

#[test]
fn gpt2_without_config_has_no_special_ids() {
    let v = load(&toy_gpt2_json(), None, 264);
    assert_eq!(
        (v.bos_id, v.eos_id, v.unk_id, v.pad_id),
        (None, None, None, None)
    );
    assert_eq!(v.chat_template, None);
    assert_eq!(v.add_space_prefix, None);
}

#[test]
fn vocab_size_below_the_tokenizer_is_refused() {
    let (_dir, tj, _) = write_files(&toy_gpt2_json(), None);
    let err = from_hf_files_with(&tj, None, 100, &smollm).unwrap_err();
    assert!(
        matches!(
            err,
            VocabError::VocabSizeTooSmall {
                id: 263,
                vocab_size: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn gpt2_tokenizer_json_round_trip() {
    let original = toy_gpt2_json();
    let v = load(&original, Some(&toy_gpt2_config()), 266);
    let tj = v.to_tokenizer_json().unwrap();
    let cfg = v.to_tokenizer_config_json();
    assert!(cfg.get("model_max_length").is_none());
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    let back = load(&tj, Some(&cfg), 266);
    let expected = Vocab {
        add_bos: Some(false),
        add_eos: Some(false),
        ..v.clone()
    };
    assert_eq!(back, expected);

    let (a, b) = (tokenizer(&original), v.hf_tokenizer().unwrap());
    for text in SAMPLES.iter().copied().chain([CHKTXT]) {
        assert_eq!(ids(&a, text), ids(&b, text), "{text:?}");
    }
    assert_eq!(chktxt_hash(&a).unwrap(), chktxt_hash(&b).unwrap());
    let decoded = b.decode(&ids(&b, "the thing"), false).unwrap();
    assert_eq!(decoded, "the thing");
}

#[test]
fn gpt2_bos_template_is_read_and_written() {
    let mut tj = toy_gpt2_json();
    tj["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}});
    let v = load(&tj, Some(&toy_gpt2_config()), 264);
    assert_eq!(v.add_bos, Some(true));
    let rebuilt = v.hf_tokenizer().unwrap();
    assert_eq!(ids(&rebuilt, "the"), ids(&tokenizer(&tj), "the"));
    assert_eq!(ids(&rebuilt, "the")[0], 1);
    let cfg = v.to_tokenizer_config_json();
    let back = load(&v.to_tokenizer_json().unwrap(), Some(&cfg), 264);
    assert_eq!(back.add_bos, Some(true));
}

#[test]
fn llama_types_scores_ids() {
    let v = load(&toy_llama_json(), Some(&toy_llama_config()), 270);
    assert_eq!(v.model, "llama");
    assert_eq!(v.pre.as_deref(), Some("default"));
    assert_eq!(&v.token_types[..4], &[UNKNOWN, CONTROL, CONTROL, BYTE]);
    assert_eq!(v.tokens[3 + 0x41], "<0x41>");
    assert!(v.token_types[3..259].iter().all(|&t| t == BYTE));
    assert!(v.token_types[259..268].iter().all(|&t| t == NORMAL));
    assert_eq!(
        (v.tokens[268].as_str(), v.token_types[268]),
        ("<tool>", USER_DEFINED)
    );
    assert_eq!(
        (v.tokens[269].as_str(), v.token_types[269]),
        ("[PAD269]", UNUSED)
    );
    let scores = v.scores.as_ref().unwrap();
    // "▁a" is made by merge 0, "ab" by 1, "▁ab" by 2, "bc" by 3, "▁c" by 4.
    assert_eq!(&scores[263..268], &[0.0, -1.0, -2.0, -3.0, -4.0]);
    assert_eq!(scores[260], -(5.0 + 260.0));
    assert_eq!((scores[268], scores[269]), (-1000.0, -1000.0));
    assert_eq!(v.merges, ["▁ a", "a b", "▁a b", "b c", "▁ c"]);
    assert_eq!(
        (v.bos_id, v.eos_id, v.unk_id, v.pad_id),
        (Some(1), Some(2), Some(0), None)
    );
    assert_eq!((v.add_bos, v.add_eos), (Some(true), Some(false)));
    assert_eq!(v.add_space_prefix, None);
    assert_eq!(v.chat_template.as_deref(), Some("T"));
}

#[test]
fn llama_tokenizer_json_round_trip() {
    let original = toy_llama_json();
    let v = load(&original, Some(&toy_llama_config()), 270);
    let tj = v.to_tokenizer_json().unwrap();
    let back = load(&tj, Some(&v.to_tokenizer_config_json()), 270);
    assert_eq!(back, v);

    let (a, b) = (tokenizer(&original), v.hf_tokenizer().unwrap());
    for text in SAMPLES.iter().copied().chain(["é ab", CHKTXT]) {
        assert_eq!(ids(&a, text), ids(&b, text), "{text:?}");
    }
    assert_eq!(ids(&b, "abc")[0], 1);
    assert_eq!(b.decode(&ids(&b, "ab cé"), true).unwrap(), "ab cé");
}

#[test]
fn llama_merges_from_scores_when_the_gguf_has_none() {
    let v = load(&toy_llama_json(), Some(&toy_llama_config()), 270);
    let no_merges = Vocab {
        merges: Vec::new(),
        ..v.clone()
    };
    let derived = no_merges.merges_from_scores().unwrap();
    assert_eq!(
        derived[..3],
        [
            ("▁".into(), "a".into()),
            ("a".into(), "b".into()),
            ("▁a".into(), "b".into())
        ]
    );
    let (a, b) = (v.hf_tokenizer().unwrap(), no_merges.hf_tokenizer().unwrap());
    for text in SAMPLES.iter().copied().chain(["é ab", CHKTXT]) {
        assert_eq!(ids(&a, text), ids(&b, text), "{text:?}");
    }
    let flat = Vocab {
        scores: Some(vec![-1000.0; 270]),
        ..no_merges.clone()
    };
    assert!(matches!(
        flat.to_tokenizer_json(),
        Err(VocabError::NoMergeOrder)
    ));
    let unscored = Vocab {
        scores: None,
        ..no_merges
    };
    assert!(matches!(
        unscored.to_tokenizer_json(),
        Err(VocabError::NoMergeOrder)
    ));
}

#[test]
fn llama_without_prepend_has_no_space_prefix() {
    let mut tj = toy_llama_json();
    tj["normalizer"] = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let v = load(&tj, Some(&toy_llama_config()), 269);
    assert_eq!(v.add_space_prefix, Some(false));
    let rebuilt = v.hf_tokenizer().unwrap();
    assert_eq!(ids(&rebuilt, "ab c"), ids(&tokenizer(&tj), "ab c"));
    let back = load(
        &v.to_tokenizer_json().unwrap(),
        Some(&v.to_tokenizer_config_json()),
        269,
    );
    assert_eq!(back.add_space_prefix, Some(false));
}

#[test]
fn gguf_kvs_round_trip() {
    for v in [
        load(&toy_gpt2_json(), Some(&toy_gpt2_config()), 266),
        load(&toy_llama_json(), Some(&toy_llama_config()), 270),
    ] {
        let kvs: HashMap<String, Value> = v.to_gguf_kvs().into_iter().collect();
        assert_eq!(kvs[KEY_TOKENS].value_type(), ValueType::Array);
        assert!(matches!(kvs[KEY_BOS_ID], Value::U32(1)));
        let back = Vocab::from_gguf(&|k| kvs.get(k).cloned()).unwrap();
        assert_eq!(back, v);
    }
}

#[test]
fn gguf_errors_name_the_key() {
    let v = load(&toy_gpt2_json(), Some(&toy_gpt2_config()), 264);
    let mut kvs: HashMap<String, Value> = v.to_gguf_kvs().into_iter().collect();
    kvs.insert(KEY_TOKEN_TYPE.into(), Value::i32s([1, 1]));
    let err = Vocab::from_gguf(&|k| kvs.get(k).cloned()).unwrap_err();
    assert!(matches!(
        err,
        VocabError::LengthMismatch {
            key: KEY_TOKEN_TYPE,
            found: 2,
            expected: 264
        }
    ));
    kvs.remove(KEY_TOKEN_TYPE);
    kvs.insert(KEY_BOS_ID.into(), Value::String("1".into()));
    let err = Vocab::from_gguf(&|k| kvs.get(k).cloned()).unwrap_err();
    assert!(err.to_string().contains(KEY_BOS_ID), "{err}");
    kvs.insert(KEY_BOS_ID.into(), Value::U32(5000));
    let err = Vocab::from_gguf(&|k| kvs.get(k).cloned()).unwrap_err();
    assert!(matches!(
        err,
        VocabError::SpecialIdOutOfRange { id: 5000, .. }
    ));
    kvs.remove(KEY_TOKENS);
    let err = Vocab::from_gguf(&|k| kvs.get(k).cloned()).unwrap_err();
    assert!(matches!(err, VocabError::MissingKey { key: KEY_TOKENS }));
}

#[test]
fn unknown_pre_and_model_are_refused_by_name() {
    let v = load(&toy_gpt2_json(), None, 264);
    let err = Vocab {
        pre: Some("bogus".into()),
        ..v.clone()
    }
    .to_tokenizer_json()
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"bogus\"") && msg.contains("smollm") && msg.contains("qwen2"),
        "{msg}"
    );
    let err = Vocab {
        model: "t5".into(),
        ..v
    }
    .to_tokenizer_json()
    .unwrap_err();
    assert!(err.to_string().contains("\"t5\""), "{err}");
}

#[test]
fn unknown_hash_is_an_error_naming_it() {
    let tok = tokenizer(&toy_gpt2_json());
    let err = detect_pre_tokenizer(&tok).unwrap_err();
    let VocabError::UnknownPreTokenizerHash { hash } = &err else {
        panic!("{err}")
    };
    assert_eq!(hash.len(), 64);
    assert!(err.to_string().contains(hash.as_str()));
    let (_dir, tj, _) = write_files(&toy_gpt2_json(), None);
    assert!(matches!(
        Vocab::from_hf_files(&tj, None, 264),
        Err(VocabError::UnknownPreTokenizerHash { .. })
    ));
}

#[test]
fn pre_names_of_the_supported_families_build() {
    let v = load(&toy_gpt2_json(), None, 264);
    for pre in SUPPORTED_GPT2_PRE {
        let tok = Vocab {
            pre: Some(pre.to_string()),
            ..v.clone()
        }
        .hf_tokenizer()
        .unwrap();
        assert!(!ids(&tok, CHKTXT).is_empty(), "{pre}");
    }
    let llama3 = Vocab {
        pre: Some("llama-bpe".into()),
        bos_id: Some(1),
        ..v.clone()
    };
    assert!(llama3.effective_add_bos());
    assert_eq!(ids(&llama3.hf_tokenizer().unwrap(), "the")[0], 1);
}

#[test]
fn bad_input_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("tokenizer.json");
    let err = Vocab::from_hf_files(&missing, None, 10).unwrap_err();
    assert!(
        matches!(err, VocabError::Io { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );

    fs::write(&missing, "{not json").unwrap();
    let err = Vocab::from_hf_files(&missing, None, 10).unwrap_err();
    assert!(
        matches!(err, VocabError::Json { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );

    fs::write(&missing, "[]").unwrap();
    let err = Vocab::from_hf_files(&missing, None, 10).unwrap_err();
    assert!(matches!(err, VocabError::Malformed { .. }), "{err}");

    for (kind, model) in [
        (
            "WordPiece",
            json!({"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}}),
        ),
        (
            "Unigram",
            json!({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]}),
        ),
    ] {
        fs::write(&missing, json!({"model": model}).to_string()).unwrap();
        let err = Vocab::from_hf_files(&missing, None, 10).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(kind) && msg.contains("tokenizer.json") && msg.contains("BPE"),
            "{msg}"
        );
    }

    let (_dir, tj, _) = write_files(&toy_gpt2_json(), None);
    let bad_cfg = dir.path().join("tokenizer_config.json");
    fs::write(&bad_cfg, "[1]").unwrap();
    let err = from_hf_files_with(&tj, Some(&bad_cfg), 264, &smollm).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn chat_template_from_a_file_beside_the_config() {
    let mut cfg = toy_gpt2_config();
    cfg.as_object_mut().unwrap().remove("chat_template");
    let (dir, tj, cfg_path) = write_files(&toy_gpt2_json(), Some(&cfg));
    fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    let v = from_hf_files_with(&tj, cfg_path.as_deref(), 264, &smollm).unwrap();
    assert_eq!(v.chat_template.as_deref(), Some("J"));
}

#[test]
fn template_eos_overrides_the_configs() {
    let mut tj = toy_gpt2_json();
    tj["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}});
    let v = load(&tj, Some(&toy_gpt2_config()), 264);
    assert_eq!(
        (v.eos_id, v.add_eos, v.add_bos),
        (Some(0), Some(true), None)
    );
}

#[test]
fn config_json_fills_unset_ids() {
    let mut v = load(&toy_gpt2_json(), None, 264);
    v.fill_special_ids_from_config_json(
        &json!({"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 9999,
                                               "text_config": {"unk_token_id": 0}}),
    );
    assert_eq!(
        (v.bos_id, v.eos_id, v.unk_id, v.pad_id),
        (Some(1), None, Some(0), None)
    );
}

#[test]
fn merge_split_follows_llama_cpp() {
    assert_eq!(split_merge("Ġ t"), ("Ġ", "t"));
    assert_eq!(split_merge("  x"), (" ", "x"));
    assert_eq!(split_merge("ab"), ("ab", ""));
    assert!(is_byte_token("<0x0A>") && !is_byte_token("<0xZZ>") && !is_byte_token("<0x0A"));
    assert!(is_pad_slot("[PAD12]") && !is_pad_slot("[PAD]") && !is_pad_slot("[PADx]"));
    assert!(looks_special("<|x|>") && looks_special("<unused3>") && !looks_special("<think>"));
}

/// End to end on the real SmolLM2 GGUF: its vocab rebuilt as a tokenizer.json must hash to the
/// converter's "smollm" and read back to the same metadata.
#[test]
#[ignore = "needs HOPSCOTCH_SMOLLM2_GGUF=path/to/SmolLM2-135M-Instruct*.gguf"]
fn smollm2_gguf_round_trip() {
    let path = std::env::var("HOPSCOTCH_SMOLLM2_GGUF").expect("HOPSCOTCH_SMOLLM2_GGUF");
    let gguf = crate::gguf::reader::GgufFile::open(&path).unwrap();
    let v = Vocab::from_gguf(&|k| gguf.get(k).cloned()).unwrap();
    assert_eq!(
        (v.model.as_str(), v.pre.as_deref()),
        ("gpt2", Some("smollm"))
    );
    let tok = v.hf_tokenizer().unwrap();
    assert_eq!(
        chktxt_hash(&tok).unwrap(),
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    );
    assert_eq!(detect_pre_tokenizer(&tok).unwrap(), "smollm");

    let (_dir, tj, cfg) = write_files(
        &v.to_tokenizer_json().unwrap(),
        Some(&v.to_tokenizer_config_json()),
    );
    let back = Vocab::from_hf_files(&tj, cfg.as_deref(), v.tokens.len()).unwrap();
    assert_eq!(
        back,
        Vocab {
            add_eos: Some(false),
            ..v.clone()
        }
    );
    let kvs: HashMap<String, Value> = back.to_gguf_kvs().into_iter().collect();
    for (key, value) in gguf
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        if key != KEY_ADD_EOS {
            assert_eq!(kvs.get(key), Some(value), "{key}");
        }
    }
}
