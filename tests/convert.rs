//! Conversion: HF folder -> GGUF -> llama.cpp, round trips, quant types and bad input.

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, write_tiny, Dtype, Tiny};
use hopscotch::checkpoint::Checkpoint;
use hopscotch::gguf::reader::GgufFile;
use hopscotch::llamacpp::LoadedModel;

fn hopscotch(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run hopscotch")
}

fn ok(args: &[&str]) {
    let out = hopscotch(args);
    assert!(
        out.status.success(),
        "hopscotch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Tensors of two GGUF files, by name: type, shape and bytes.
fn same_tensors(a: &Path, b: &Path) {
    let fa = GgufFile::open(a).unwrap();
    let fb = GgufFile::open(b).unwrap();
    assert_eq!(fa.tensors().len(), fb.tensors().len());
    for ta in fa.tensors() {
        let tb = fb
            .tensor(&ta.name)
            .unwrap_or_else(|| panic!("{} missing", ta.name));
        assert_eq!(ta.ggml_type, tb.ggml_type, "{}", ta.name);
        assert_eq!(ta.dims, tb.dims, "{}", ta.name);
        assert!(
            fa.tensor_data(ta) == fb.tensor_data(tb),
            "{} bytes differ",
            ta.name
        );
    }
}

#[test]
fn gguf_to_hf_to_gguf_is_bit_exact_for_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    for (tiny, ty) in [
        (Tiny::llama(), "f32"),
        (Tiny::qwen2(), "f16"),
        (Tiny::llama(), "f16"),
    ] {
        let hf = write_tiny(dir.path(), &tiny);
        let g1 = dir.path().join(format!("{}-{ty}-1.gguf", tiny.arch));
        let hf2 = dir.path().join(format!("{}-{ty}-hf2", tiny.arch));
        let g2 = dir.path().join(format!("{}-{ty}-2.gguf", tiny.arch));
        ok(&["convert", s(&hf), "-o", s(&g1), "--type", ty]);
        ok(&["convert", s(&g1), "-o", s(&hf2), "--to", "hf"]);
        ok(&["convert", s(&hf2), "-o", s(&g2), "--type", ty]);
        same_tensors(&g1, &g2);
        let (f1, f2) = (GgufFile::open(&g1).unwrap(), GgufFile::open(&g2).unwrap());
        for key in [
            "general.architecture",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.chat_template",
        ] {
            assert_eq!(
                f1.get(key),
                f2.get(key),
                "{key} differs after the round trip"
            );
        }
        let arch = f1.get_str("general.architecture").unwrap().to_string();
        for (k, v) in f1.metadata() {
            if k.starts_with(&format!("{arch}.")) {
                assert_eq!(Some(v), f2.get(k), "{k} differs after the round trip");
            }
        }
    }
}

#[test]
fn llama_cpp_tokenizes_real_text_the_same_after_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let g1 = dir.path().join("a.gguf");
    let hf2 = dir.path().join("hf2");
    let g2 = dir.path().join("b.gguf");
    ok(&["convert", s(&hf), "-o", s(&g1), "--type", "f32"]);
    ok(&["convert", s(&g1), "-o", s(&hf2), "--to", "hf"]);
    ok(&["convert", s(&hf2), "-o", s(&g2), "--type", "f32"]);
    let text = std::fs::read_to_string(common::cache_dir().join("text/prideprejudice.txt"))
        .expect("run scripts/fetch-text.sh first");
    let text: String = text.chars().take(20_000).collect();
    let a = LoadedModel::load(&g1).unwrap().tokenize(&text, true);
    let b = LoadedModel::load(&g2).unwrap().tokenize(&text, true);
    assert!(a.len() > 3000);
    assert_eq!(a, b);
}

#[test]
fn sharded_bf16_converts_to_f16_with_expected_types() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny {
        dtype: Dtype::BF16,
        shards: 3,
        ..Tiny::qwen2()
    };
    let hf = write_tiny(dir.path(), &tiny);
    let out = dir.path().join("q.gguf");
    ok(&["convert", s(&hf), "-o", s(&out), "--type", "f16"]);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "qwen2");
    for t in f.tensors() {
        let want = if t.dims.len() == 1 { "f32" } else { "f16" };
        assert_eq!(t.ggml_type.name(), want, "{}", t.name);
    }
    assert!(f.tensor("blk.0.attn_q.bias").is_some());
    assert!(f.tensor("output.weight").is_some());
    let ck = Checkpoint::open(&hf).unwrap();
    assert_eq!(ck.tensors.len(), f.tensors().len());
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
}

#[test]
fn quantized_types_go_through_llama_cpp_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    for ty in ["q8_0", "q4_k_m", "iq4_nl", "q6_k"] {
        let out = dir.path().join(format!("{ty}.gguf"));
        ok(&["convert", s(&hf), "-o", s(&out), "--type", ty]);
        let m = LoadedModel::load(&out).unwrap();
        assert_eq!(m.n_vocab(), common::VOCAB);
        // no temporary file is left next to the output
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    let f = GgufFile::open(dir.path().join("q8_0.gguf")).unwrap();
    assert!(f.tensors().iter().any(|t| t.ggml_type.name() == "q8_0"));
}

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let out = dir.path().join("out.gguf");

    let check = |args: &[&str], needle: &str| {
        let o = hopscotch(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{args:?} left an output");
    };
    check(
        &["convert", s(&hf), "-o", s(&out), "--type", "q9_z"],
        "q4_k_m",
    );

    // unknown architecture
    let bad = dir.path().join("badarch");
    std::fs::create_dir_all(&bad).unwrap();
    for f in std::fs::read_dir(&hf).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(bad.join("config.json")).unwrap();
    std::fs::write(
        bad.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    check(&["convert", s(&bad), "-o", s(&out)], "GPTNeoXForCausalLM");

    // config without a needed key
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut c2 = cfg.clone();
    c2.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(bad.join("config.json"), c2.to_string()).unwrap();
    check(&["convert", s(&bad), "-o", s(&out)], "hidden_size");

    // shape mismatch: config says wider than the tensors are
    let mut c3 = cfg.clone();
    c3["intermediate_size"] = 256.into();
    std::fs::write(bad.join("config.json"), c3.to_string()).unwrap();
    check(&["convert", s(&bad), "-o", s(&out)], "ffn_gate");

    // truncated safetensors
    std::fs::write(bad.join("config.json"), cfg.to_string()).unwrap();
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(bad.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    check(&["convert", s(&bad), "-o", s(&out)], "model.safetensors");

    // truncated and corrupt GGUF
    let good = dir.path().join("good.gguf");
    ok(&["convert", s(&hf), "-o", s(&good), "--type", "f32"]);
    let bytes = std::fs::read(&good).unwrap();
    let trunc = dir.path().join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() - 1000]).unwrap();
    check(&["convert", s(&trunc), "-o", s(&out)], "trunc.gguf");
    let mut corrupt = bytes.clone();
    corrupt[0] = b'X';
    std::fs::write(&trunc, &corrupt).unwrap();
    check(&["convert", s(&trunc), "-o", s(&out)], "trunc.gguf");

    // an existing output is kept without --force
    std::fs::write(&out, b"keep me").unwrap();
    let o = hopscotch(&["convert", s(&hf), "-o", s(&out)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    ok(&["convert", s(&hf), "-o", s(&out), "--force"]);
    assert!(GgufFile::open(&out).is_ok());
}
