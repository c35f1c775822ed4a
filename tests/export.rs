//! Export: the folded model equals the model with scalars (candle with the plan's scalars vs
//! candle on the folded weights, and vs llama.cpp on the exported `deci` file), the file's
//! layout, quantization, the Modelfile, and bad plans.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    add_stand_ins, bin, candle_logits, llama_logits, max_abs_diff, plan_for, sample_tokens,
    write_tiny, Tiny,
};
use hopscotch::arch::Arch;
use hopscotch::checkpoint::{Checkpoint, CheckpointError, TensorSource};
use hopscotch::fold::{Fold, FoldedWeights};
use hopscotch::gguf::reader::GgufFile;
use hopscotch::llamacpp::LoadedModel;
use hopscotch::plan::Plan;
use hopscotch::plan::{LinearAttention, ScaleValues};

fn hopscotch(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run hopscotch")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The folded weights, with a skipped layer's dropped attention tensors served from the
/// original so that the candle model (which needs every tensor, and never reads those with the
/// skip mask) can load them.
struct FoldedWithDropped<'a> {
    folded: FoldedWeights<'a>,
    ck: &'a Checkpoint,
}

impl TensorSource for FoldedWithDropped<'_> {
    fn arch(&self) -> &Arch {
        &self.ck.arch
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        match self.folded.tensor_f32(name) {
            Err(CheckpointError::MissingTensor { .. }) => self.ck.tensor_f32(name),
            r => r,
        }
    }
}

fn export(hf: &Path, plan: &Path, out: &Path, ty: &str) {
    let o = hopscotch(&[
        "export",
        s(hf),
        "--plan",
        s(plan),
        "-o",
        s(out),
        "--type",
        ty,
    ]);
    assert!(
        o.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

// Bounds, relative to the largest |logit| (about 22 for the tied tiny Llama, 4.5 for Qwen2):
// - candle with scalars vs candle on the folded weights without scalars: RMSNorm's epsilon
//   (the folded stream h/c is normed with eps where h/c² would need eps/c², a relative change
//   of eps (c² - 1) / (2 mean(h²)) with mean(h²) about 0.3 in these random models) plus f32
//   rounding. Measured 2.1e-5..2.4e-5 relative with eps 1e-5; it scales with eps (2.4e-3 at eps
//   1e-3, 1.3e-6 at eps 1e-12, where only rounding is left).
// - candle with scalars vs llama.cpp on the exported f32 file: the same plus summation order
//   (2e-4 absolute in tests/equivalence.rs); measured equal to the fold difference to 1e-6.
const FOLD_BOUND: f32 = 1e-4;
const LLAMA_CPP_EXTRA: f32 = 2e-4;

/// The fold of a plan with `skipped` blocks (`linear` of them with stand-ins), `negative`: one
/// negative `s_mlp`: candle with the scalars against candle on the
/// folded weights and against llama.cpp on the exported f32 file.
fn check_fold(tiny: Tiny, skipped: &[usize], linear: &[usize], negative: bool, expect_arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &tiny);
    let ck = Checkpoint::open(&hf).unwrap();
    let mut plan = plan_for(&ck, skipped, 3 + skipped.len() as u64);
    if negative {
        // a sign flip of the stream: exact through the norms' sign
        plan.scales.s_mlp[2] = -0.8;
    }
    add_stand_ins(&ck, &mut plan, linear, 17);
    let skip = plan.skip_mask();
    let toks = sample_tokens();
    let gated = candle_logits(&ck, &plan.scales, &skip, &toks);

    let fold = Fold::new(ck.arch.n_layer, ck.arch.n_embd, &skip, &plan.scales).unwrap();
    let folded = FoldedWithDropped {
        folded: FoldedWeights::new(&ck, &fold),
        ck: &ck,
    };
    let n = ck.arch.n_layer;
    // the folded model: every scalar 1, each stand-in the folded `attn_output` of its layer
    let mut ones = ScaleValues::ones(n);
    for &layer in linear {
        let (_, weight) = folded
            .tensor_f32(&format!("blk.{layer}.attn_output.weight"))
            .unwrap();
        ones.linear.push(LinearAttention {
            layer,
            weight: weight.into(),
        });
    }
    let plain = candle_logits(&folded, &ones, &skip, &toks);
    let (d_fold, scale) = max_abs_diff(&gated, &plain);

    let plan_path = dir.path().join("plan.json");
    plan.save(&plan_path, false).unwrap();
    let out = dir.path().join("slim.gguf");
    export(&hf, &plan_path, &out, "f32");
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), expect_arch);
    let got = llama_logits(&out, &toks);
    let (d_cpp, _) = max_abs_diff(&gated, &got);

    let unfolded = candle_logits(&ck, &ScaleValues::ones(n), &skip, &toks);
    let (d_scalars, _) = max_abs_diff(&gated, &unfolded);
    eprintln!(
        "{} skip {skipped:?}{}{}: max |logit| {scale:.2}; folded candle {d_fold:.2e} ({:.1e} relative), llama.cpp {d_cpp:.2e} (the scalars themselves move logits by {d_scalars:.2}; c in {:.3}..{:.3})",
        tiny.arch,
        if negative { " with a negative s_mlp" } else { "" },
        if linear.is_empty() {
            String::new()
        } else {
            format!(" with linear stand-ins for {linear:?}")
        },
        d_fold / scale,
        fold.residual_range().0,
        fold.residual_range().1,
    );
    // the scalars matter, so agreement is not an accident
    assert!(d_scalars > 0.1, "{d_scalars}");
    if !linear.is_empty() {
        // and so do the stand-ins
        let mut without = plan.scales.clone();
        without.linear.clear();
        let (d_stand_ins, _) = max_abs_diff(&gated, &candle_logits(&ck, &without, &skip, &toks));
        assert!(d_stand_ins > 0.1, "{d_stand_ins}");
    }
    let fold_bound = FOLD_BOUND * scale;
    assert!(d_fold <= fold_bound, "fold: {d_fold} > {fold_bound}");
    let cpp_bound = fold_bound + LLAMA_CPP_EXTRA;
    assert!(d_cpp <= cpp_bound, "llama.cpp: {d_cpp} > {cpp_bound}");
}

#[test]
fn folded_llama_matches_the_model_with_scalars() {
    check_fold(Tiny::llama(), &[1, 3], &[], false, "deci");
    check_fold(Tiny::llama(), &[2], &[], true, "deci");
    check_fold(Tiny::llama(), &[], &[], false, "llama");
    check_fold(Tiny::llama(), &[1, 3], &[], true, "deci");
}

#[test]
fn folded_linear_stand_ins_match_the_model_with_them() {
    // deci's "linear attention" in llama.cpp: a layer with heads and no KV heads
    check_fold(Tiny::llama(), &[1, 3], &[3], false, "deci");
    check_fold(Tiny::llama(), &[1, 2], &[1, 2], true, "deci");
    check_fold(Tiny::qwen2(), &[2], &[2], false, "deci");
}

#[test]
fn folded_qwen2_matches_the_model_with_scalars() {
    check_fold(Tiny::qwen2(), &[1, 3], &[], false, "deci");
    check_fold(Tiny::qwen2(), &[], &[], true, "qwen2");
    check_fold(Tiny::qwen2(), &[2], &[], false, "deci");
}

fn arr(f: &GgufFile, key: &str) -> Vec<i64> {
    f.get_arr(key)
        .unwrap()
        .iter()
        .map(|v| match v {
            hopscotch::gguf::Value::I32(x) => *x as i64,
            other => panic!("{key}: {other:?} is not INT32"),
        })
        .collect()
}

#[test]
fn exported_deci_file_has_the_slim_layout_and_loads_also_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny::qwen2();
    let hf = write_tiny(dir.path(), &tiny);
    let ck = Checkpoint::open(&hf).unwrap();
    let plan = plan_for(&ck, &[3, 1], 5);
    let plan_path = dir.path().join("plan.json");
    plan.save(&plan_path, false).unwrap();
    for ty in ["f16", "q4_k_m"] {
        let out = dir.path().join(format!("slim-{ty}.gguf"));
        export(&hf, &plan_path, &out, ty);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "deci");
        let n = f.get_u64("deci.block_count").unwrap() as usize;
        assert_eq!(n, tiny.n_layer);
        let heads = arr(&f, "deci.attention.head_count");
        let kv = arr(&f, "deci.attention.head_count_kv");
        let ff = arr(&f, "deci.feed_forward_length");
        assert_eq!(heads, vec![4, 0, 4, 0]);
        assert_eq!(kv, vec![2, 0, 2, 0]);
        assert_eq!(ff, vec![tiny.n_ff as i64; n]);
        for (l, &n_head) in heads.iter().enumerate() {
            let attn: Vec<_> = f
                .tensors()
                .iter()
                .filter(|t| t.name.starts_with(&format!("blk.{l}.attn_")))
                .map(|t| t.name.clone())
                .collect();
            if n_head == 0 {
                assert!(attn.is_empty(), "layer {l} keeps {attn:?}");
            } else {
                // norm, q/k/v weights and biases, output
                assert_eq!(attn.len(), 8, "layer {l}: {attn:?}");
            }
            assert!(f.tensor(&format!("blk.{l}.ffn_down.weight")).is_some());
        }
        if ty == "q4_k_m" {
            // tiny rows (64) are not whole k-quant blocks: llama.cpp falls back to other types
            assert!(f.tensors().iter().any(|t| t.ggml_type.is_quantized()));
        }
        let m = LoadedModel::load(&out).unwrap();
        assert_eq!(m.n_vocab(), common::VOCAB);
        let toks = sample_tokens();
        let logits = llama_logits(&out, &toks);
        assert!(logits.iter().flatten().all(|x| x.is_finite()));

        let mf = std::fs::read_to_string(dir.path().join(format!("slim-{ty}.Modelfile"))).unwrap();
        assert!(mf.contains(&format!("FROM ./slim-{ty}.gguf\n")), "{mf}");
        assert!(mf.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\""), "{mf}");
        assert!(mf.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM, trained by Hugging Face\"\"\""), "{mf}");
        assert!(mf.contains("PARAMETER stop \"<|im_end|>\"\n"), "{mf}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// q4_k_m gives attn_v more bits in some layers, chosen by the tensor's index among the file's
/// attn_v tensors and their count (llama.cpp's `use_more_bits`), which both shift when blocks
/// are skipped: every tensor the slim file keeps gets the type it has in the original's q4_k_m
/// file, and the original's attn_v types are not all one (so the check can fail).
#[test]
fn kept_tensors_are_quantized_as_in_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny {
        n_layer: 8,
        ..Tiny::llama()
    };
    let hf = write_tiny(dir.path(), &tiny);
    let ck = Checkpoint::open(&hf).unwrap();
    let plan = plan_for(&ck, &[2, 5], 3);
    let plan_path = dir.path().join("plan.json");
    plan.save(&plan_path, false).unwrap();
    let slim = dir.path().join("slim.gguf");
    export(&hf, &plan_path, &slim, "q4_k_m");
    let original = dir.path().join("original.gguf");
    let o = hopscotch(&["convert", s(&hf), "-o", s(&original), "--type", "q4_k_m"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        GgufFile::open(&original).unwrap(),
        GgufFile::open(&slim).unwrap(),
    );
    let type_in = |f: &GgufFile, name: &str| f.tensor(name).map(|t| t.ggml_type);
    let mut compared = 0;
    for t in b.tensors() {
        if let Some(ty) = type_in(&a, &t.name) {
            assert_eq!(t.ggml_type, ty, "{}", t.name);
            compared += 1;
        }
    }
    assert_eq!(compared, b.tensors().len());
    let v_types: std::collections::BTreeSet<_> = (0..tiny.n_layer)
        .filter_map(|l| type_in(&a, &format!("blk.{l}.attn_v.weight")))
        .map(|t| t.name())
        .collect();
    assert!(v_types.len() > 1, "{v_types:?}");
}

/// A linear stand-in exports as deci's "linear attention": heads but no KV heads, only
/// `attn_norm` and an `n_embd x n_embd` `attn_output`; llama.cpp loads and runs it, `inspect`
/// names it, and a stand-in for a block that is not skipped is refused.
#[test]
fn a_linear_stand_in_is_a_deci_linear_attention_layer() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny::qwen2();
    let hf = write_tiny(dir.path(), &tiny);
    let ck = Checkpoint::open(&hf).unwrap();
    let mut plan = plan_for(&ck, &[3, 1], 5);
    add_stand_ins(&ck, &mut plan, &[1], 7);
    let plan_path = dir.path().join("plan.json");
    plan.save(&plan_path, false).unwrap();
    // the stand-in reads back bit for bit
    assert_eq!(Plan::load(&plan_path).unwrap(), plan);
    let out = dir.path().join("slim.gguf");
    export(&hf, &plan_path, &out, "f16");
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(arr(&f, "deci.attention.head_count"), vec![4, 4, 4, 0]);
    assert_eq!(arr(&f, "deci.attention.head_count_kv"), vec![2, 0, 2, 0]);
    let layer1: Vec<(String, Vec<u64>)> = f
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.1.attn_"))
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    let d = tiny.n_embd as u64;
    assert_eq!(
        layer1,
        vec![
            ("blk.1.attn_norm.weight".to_string(), vec![d]),
            ("blk.1.attn_output.weight".to_string(), vec![d, d]),
        ]
    );
    let logits = llama_logits(&out, &sample_tokens());
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
    let shown = hopscotch(&["inspect", s(&out)]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("linear attention layers 1\n"), "{text}");
    assert!(text.contains("attention-free   layers 3\n"), "{text}");

    // a stand-in for layer 2, whose block is kept
    let mut bad = plan.clone();
    add_stand_ins(&ck, &mut bad, &[2], 9);
    let bad_path = dir.path().join("bad.json");
    bad.save(&bad_path, false).unwrap();
    let target = dir.path().join("bad.gguf");
    let o = hopscotch(&["export", s(&hf), "--plan", s(&bad_path), "-o", s(&target)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.json: not a valid plan: scales.linear has a stand-in for layer 2, whose attention block is not skipped"),
        "{err}"
    );
    assert!(!target.exists());
}

/// The slim model's importance matrix (`hopscotch imatrix --plan`) and `export --imatrix`: a
/// type that needs one is refused without it and with one made for another model, writing
/// nothing; with the slim model's own it quantizes, loads and runs, and it changes what q4_k_m
/// writes (the quantizer uses it). Rows of 256 so that iq2_xxs and q4_K apply to the matrices.
#[test]
fn low_bit_types_quantize_with_the_slim_models_importance_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny {
        n_embd: 256,
        n_ff: 512,
        ..Tiny::llama()
    };
    let hf = write_tiny(dir.path(), &tiny);
    let ck = Checkpoint::open(&hf).unwrap();
    let plan_path = dir.path().join("plan.json");
    plan_for(&ck, &[2], 3).save(&plan_path, false).unwrap();
    let task = common::write_choice_task(dir.path(), "facts", &common::facts());
    let imatrix = |hf: &Path, plan: Option<&Path>, out: &Path| {
        let mut args = vec![
            "imatrix",
            s(hf),
            "--task",
            s(&task),
            "--docs",
            "8",
            "-o",
            s(out),
        ];
        if let Some(p) = plan {
            args.extend(["--plan", s(p)]);
        }
        let o = hopscotch(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let im_path = dir.path().join("slim.imatrix.gguf");
    // the hand-made plan was trained on no document: eval --exclude-fit evaluates all 8
    let said = imatrix(&hf, Some(&plan_path), &im_path);
    assert!(
        said.contains("8 of the documents are beyond the plan's own"),
        "{said}"
    );
    let im = hopscotch::gguf::imatrix::Imatrix::read(&im_path).unwrap();
    // 4 layers x 7 matrices, none for the skipped attention, none for the tied LM head
    assert_eq!(im.entries.len(), 4 * 7 - 4, "{:?}", im.entries.keys());
    assert!(!im.entries.contains_key("blk.2.attn_output.weight"));
    let shown = hopscotch(&["inspect", s(&im_path), "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["imatrix"]["entries"], 24);
    assert_eq!(shown["imatrix"]["blocks"], 4);
    assert_eq!(
        shown["imatrix"]["tokens"],
        im.entries["blk.0.ffn_up.weight"].counts[0] as f64
    );
    for (name, e) in &im.entries {
        assert!(e.counts[0] > 0.0, "{name}");
        assert!(e.sums.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}");
        assert!(e.sums.iter().any(|v| *v > 0.0), "{name}");
    }

    let out = dir.path().join("slim.gguf");
    let export = |ty: &str, im: Option<&Path>, out: &Path| {
        let mut args = vec!["export", s(&hf), "--plan", s(&plan_path), "-o", s(out)];
        args.extend(["--type", ty, "--force"]);
        if let Some(p) = im {
            args.extend(["--imatrix", s(p)]);
        }
        hopscotch(&args)
    };
    let refused = |o: std::process::Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        assert!(!out.exists(), "{err}");
    };
    refused(
        export("iq2_xxs", None, &out),
        "iq2_xxs needs an importance matrix",
    );
    refused(
        export("f16", Some(&im_path), &out),
        "only applies to quantized types; f16",
    );
    let other_hf = write_tiny(
        &dir.path().join("other"),
        &Tiny {
            n_embd: 128,
            n_ff: 512,
            ..Tiny::llama()
        },
    );
    let other_im = dir.path().join("other.imatrix.gguf");
    imatrix(&other_hf, None, &other_im);
    refused(
        export("iq2_xxs", Some(&other_im), &out),
        "has 128 values, but",
    );

    let o = export("iq2_xxs", Some(&im_path), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = GgufFile::open(&out).unwrap();
    let iq2 = f
        .tensors()
        .iter()
        .filter(|t| t.ggml_type.name() == "iq2_xxs")
        .count();
    assert!(iq2 > 0, "no iq2_xxs tensor");
    let logits = llama_logits(&out, &sample_tokens());
    assert!(logits.iter().flatten().all(|x| x.is_finite()));

    let data = |p: &Path| {
        let f = GgufFile::open(p).unwrap();
        let t = f.tensor("blk.1.attn_q.weight").unwrap().clone();
        (t.ggml_type.name(), f.tensor_data(&t).to_vec())
    };
    let (plain, weighted) = (dir.path().join("q4.gguf"), dir.path().join("q4-im.gguf"));
    assert!(export("q4_k_m", None, &plain).status.success());
    assert!(export("q4_k_m", Some(&im_path), &weighted).status.success());
    let (a, b) = (data(&plain), data(&weighted));
    assert_eq!(a.0, "q4_K");
    assert_eq!(a.0, b.0);
    assert_ne!(a.1, b.1, "the importance matrix changed nothing");
}

#[test]
fn bad_plans_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let ck = Checkpoint::open(&hf).unwrap();
    let other_hf = write_tiny(
        &dir.path().join("other"),
        &Tiny {
            seed: 99,
            ..Tiny::llama()
        },
    );
    let other = Checkpoint::open(&other_hf).unwrap();
    let out = dir.path().join("slim.gguf");
    let modelfile = dir.path().join("slim.Modelfile");
    let write_plan = |name: &str, plan: &Plan| -> PathBuf {
        let p = dir.path().join(name);
        plan.save(&p, true).unwrap();
        p
    };
    let check = |plan: &Path, needle: &str| {
        let o = hopscotch(&["export", s(&hf), "--plan", s(plan), "-o", s(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{plan:?}: {err}");
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !out.exists() && !modelfile.exists(),
            "{plan:?} left an output"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    };

    let foreign = write_plan("foreign.json", &plan_for(&other, &[2], 1));
    check(&foreign, "fitted on");
    let layer0 = write_plan("layer0.json", &plan_for(&ck, &[0, 2], 1));
    check(&layer0, "layer 0");
    let all = write_plan("all.json", &plan_for(&ck, &[0, 1, 2, 3], 1));
    check(&all, "at least one must stay");
    let mut zero = plan_for(&ck, &[2], 1);
    zero.scales.s_mlp[1] = 0.0;
    let zero = write_plan("zero.json", &zero);
    check(&zero, "s_mlp[1] is 0");
    // a plan with channel gains, a retired option, is refused rather than exported without them
    let mut gained = serde_json::to_value(plan_for(&ck, &[2], 1)).unwrap();
    gained["scales"]["gains"] = serde_json::json!({"att": [[1.0]], "mlp": [[1.0]]});
    let gained_path = dir.path().join("gains.json");
    std::fs::write(&gained_path, gained.to_string()).unwrap();
    check(
        &gained_path,
        "scales.gains comes from an option hopscotch no longer has",
    );
    // a plan listing one task file twice (by content) is refused
    let mut twice = plan_for(&ck, &[2], 1);
    twice.other_tasks = vec![twice.first_task.clone()];
    let twice = write_plan("twice.json", &twice);
    check(&twice, "has the same content (sha256) as task test.jsonl");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"skipped_blocks\": [1]}").unwrap();
    check(&garbage, "not a valid plan");

    // existing outputs are kept without --force, replaced with it
    let good = write_plan("good.json", &plan_for(&ck, &[2], 1));
    std::fs::write(&modelfile, b"keep me").unwrap();
    let o = hopscotch(&["export", s(&hf), "--plan", s(&good), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(!out.exists());
    assert_eq!(std::fs::read(&modelfile).unwrap(), b"keep me");
    let o = hopscotch(&[
        "export",
        s(&hf),
        "--plan",
        s(&good),
        "-o",
        s(&out),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(GgufFile::open(&out).is_ok());
    assert!(std::fs::read_to_string(&modelfile)
        .unwrap()
        .contains("FROM ./slim.gguf"));
}

/// Manual check on the real SmolLM2-135M-Instruct Q4_1 GGUF: skip 4 late attention blocks with
/// every scalar at 1, export f16 and q4_k_m `deci`, load them and measure perplexity against
/// the original; with nothing skipped the plain f16 export must score as the original does.
#[test]
#[ignore = "manual: needs the real model and text (scripts/fetch-model.sh, scripts/fetch-text.sh)"]
fn real_smollm2_exports_to_deci_and_evaluates() {
    let model = common::real_model();
    let text = common::cache_dir().join("text/prideprejudice.txt");
    let ck = Checkpoint::open(&model).unwrap();
    let n = ck.arch.n_layer;
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, skipped: &[usize], ty: &str| -> (f64, f64) {
        let mut plan = plan_for(&ck, skipped, 0);
        plan.scales = ScaleValues::ones(n);
        let plan_path = dir.path().join(format!("{name}.json"));
        plan.save(&plan_path, false).unwrap();
        let out = dir.path().join(format!("{name}.gguf"));
        let o = hopscotch(&[
            "export",
            s(&model),
            "--plan",
            s(&plan_path),
            "-o",
            s(&out),
            "--type",
            ty,
        ]);
        eprintln!("{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success());
        let modelfile = dir.path().join(format!("{name}.Modelfile"));
        eprintln!("{}", std::fs::read_to_string(modelfile).unwrap());
        let o = hopscotch(&[
            "eval",
            s(&out),
            "--text",
            s(&text),
            "--chunks",
            "4",
            "--reference",
            s(&model),
        ]);
        let report = String::from_utf8_lossy(&o.stdout).into_owned();
        eprintln!("{report}{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success());
        let value = |label: &str| -> f64 {
            report
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {label} in {report}"))
        };
        (value("perplexity"), value("reference ppl"))
    };
    let skipped: Vec<usize> = (n - 6..n - 2).collect();
    let (ppl, reference) = run("slim", &skipped, "f16");
    assert!(ppl.is_finite() && ppl > reference, "{ppl} vs {reference}");
    let (ppl_q, _) = run("slim-q4_k_m", &skipped, "q4_k_m");
    assert!(ppl_q.is_finite() && ppl_q < 1.5 * ppl, "{ppl_q} vs {ppl}");
    let (ppl, reference) = run("full", &[], "f16");
    assert!((ppl / reference - 1.0).abs() < 0.01, "{ppl} vs {reference}");
}

/// Manual check of the fold on the real SmolLM2-135M-Instruct Q4_1 GGUF: candle with the plan's
/// scalars and stand-ins against llama.cpp on the folded f32 `deci` export, logits at every
/// position of a sentence. The plan is `HOPSCOTCH_PLAN` when set (a fitted plan of this model),
/// else blocks [5, 6, 7, 26] skipped, 7 and 26 with random stand-ins, other scalars 1.
#[test]
#[ignore = "manual: needs the real model (scripts/fetch-model.sh)"]
fn real_smollm2_fold_with_stand_ins_matches_candle() {
    let model = common::real_model();
    let ck = Checkpoint::open(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan_path = match std::env::var_os("HOPSCOTCH_PLAN") {
        Some(p) => PathBuf::from(p),
        None => {
            let mut plan = plan_for(&ck, &[5, 6, 7, 26], 0);
            // scalars at 1: random residual scalars over 30 layers move the running factor far
            // enough for RMSNorm's epsilon to show (4e-2 of 30 in logits); fitted plans keep it
            // near 1
            plan.scales = ScaleValues::ones(ck.arch.n_layer);
            add_stand_ins(&ck, &mut plan, &[7, 26], 1);
            let p = dir.path().join("plan.json");
            plan.save(&p, false).unwrap();
            p
        }
    };
    let plan = Plan::load(&plan_path).unwrap();
    let out = dir.path().join("slim.gguf");
    export(&model, &plan_path, &out, "f32");
    let text = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer: Sunlight is the source of energy for nearly all ecosystems.";
    let toks = LoadedModel::load(&model).unwrap().tokenize(text, false);
    let skip = plan.skip_mask();
    let gated = candle_logits(&ck, &plan.scales, &skip, &toks);
    let got = llama_logits(&out, &toks);
    let (d, scale) = max_abs_diff(&gated, &got);
    let unfolded = candle_logits(&ck, &ScaleValues::ones(ck.arch.n_layer), &skip, &toks);
    let (d_scalars, _) = max_abs_diff(&gated, &unfolded);
    eprintln!(
        "{} tokens, skip {:?}: max |logit| {scale:.2}, llama.cpp vs candle {d:.2e}; the scalars and gains move logits by {d_scalars:.2}",
        toks.len(),
        plan.skipped_blocks
    );
    assert!(d <= 1e-3 * scale.max(1.0), "{d} vs {scale}");
}
