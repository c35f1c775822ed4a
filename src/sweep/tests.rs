//! Tests of the sweep's configurations, splits and recorded configuration.

use std::path::Path;

use super::config::*;
use super::*;

#[test]
fn configurations_merge_what_no_objective_changes() {
    let configs = Config::all(
        2,
        &[Method::Hopscotch, Method::Random],
        &[Objective::Kl, Objective::Ce],
        true,
    );
    let names = ["a".to_string(), "b".to_string()];
    let a: Vec<String> = configs
        .iter()
        .filter(|c| c.fit_task == 0)
        .map(|c| c.name(&names))
        .collect();
    assert_eq!(
        a,
        [
            "a-hopscotch-kl",
            "a-hopscotch-ce",
            "a-hopscotch-kl-noscales",
            "a-hopscotch-ce-noscales",
            "a-random-kl",
            "a-random-ce",
            "a-random-noscales",
        ]
    );
    assert_eq!(configs.len(), 14);
    let random_bare = configs.iter().find(|c| c.objective.is_none()).unwrap();
    let o = random_bare.options(&FitSettings::default(), 3);
    assert_eq!(
        (o.skip, o.objective, o.train_scales),
        (3, Objective::Ce, false)
    );
    assert_eq!(
        Config::all(1, &[Method::AttnCosine], &[Objective::Kl], false).len(),
        1
    );
}

#[test]
fn every_configuration_is_evaluated_without_the_fit_and_final_documents() {
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "request": {"context": format!("Question {i}?"), "continuation": " yes"},
                "doc_id": i, "idx": 0, "label": 0,
                "doc": {"query": format!("Question {i}?"), "choices": [" yes"], "gold": 0},
            })
            .to_string()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let options = FitSettings {
        fit_docs: 2,
        final_docs: Some(5),
        seed: 3,
        ..FitSettings::default()
    };
    let t = SweepTask::new("t".into(), task::load(&path).unwrap(), &options);
    let (five, _) = task::split(&t.data.docs, 5, 3);
    let mut trained: Vec<String> = t.fit_ids.iter().chain(&t.final_ids).cloned().collect();
    trained.sort();
    let mut expected: Vec<String> = five.iter().map(|&i| t.data.docs[i].id.clone()).collect();
    expected.sort();
    assert_eq!((t.fit_ids.len(), trained), (2, expected));
    let held: Vec<&str> = t
        .selection(None)
        .unwrap()
        .docs
        .iter()
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(held.len(), 7);
    assert!(held
        .iter()
        .all(|id| !t.fit_ids.iter().chain(&t.final_ids).any(|f| f == id)));
}

#[test]
fn task_names_drop_the_extensions_and_odd_characters() {
    assert_eq!(task_name(Path::new("/x/arc_easy.jsonl.gz")), "arc_easy");
    assert_eq!(task_name(Path::new("my task.json")), "my_task");
    assert_eq!(task_name(Path::new("t.v2.jsonl")), "t.v2");
    assert_eq!(task_name(Path::new(".jsonl")), "task");
}

fn config() -> SweepConfig {
    SweepConfig {
        model: ModelFingerprint {
            architecture: "LlamaForCausalLM".into(),
            n_layer: 4,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            vocab_size: 100,
            tensor_sha256: "ab".repeat(32),
        },
        quant_type: "q4_k_m".into(),
        limit: Some(100),
        n_ctx: 4096,
        fit: FitSettings::default().recorded(0, 0),
        tasks: [("a".to_string(), "11".repeat(32))].into(),
        skips: vec![1, 2],
        methods: vec!["hopscotch".into()],
        objectives: vec!["kl".into()],
        no_scales_too: false,
    }
}

#[test]
fn a_configuration_differs_in_what_units_depend_on_only() {
    let old = config();
    let mut new = config();
    new.skips = vec![1, 2, 4];
    new.methods.push("random".into());
    new.tasks.insert("b".into(), "22".repeat(32));
    assert!(
        new.differences(&old).is_empty(),
        "{:?}",
        new.differences(&old)
    );

    new.fit.seed = 3;
    new.quant_type = "q8_0".into();
    new.tasks.insert("a".into(), "33".repeat(32));
    let d = new.differences(&old).join("; ");
    for needle in [
        "seed (0 recorded, 3 now)",
        "--type (q4_k_m recorded, q8_0 now)",
        "task file a",
    ] {
        assert!(d.contains(needle), "{d}");
    }
    assert_eq!(new.differences(&old).len(), 3);
}
