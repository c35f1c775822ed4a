use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn write_gz(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    path
}

/// One request line as the OLMES files have it.
fn request(
    doc_id: u64,
    idx: u64,
    label: serde_json::Value,
    context: &str,
    continuation: &str,
) -> String {
    json!({
        "request_type": "loglikelihood",
        "doc": {"id": format!("Q{doc_id}"), "query": context, "choices": [], "gold": label},
        "request": {"context": context, "continuation": continuation},
        "idx": idx,
        "task_name": "test",
        "doc_id": doc_id,
        "native_id": format!("Q{doc_id}"),
        "label": label,
    })
    .to_string()
}

fn lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn choices(doc: &Doc) -> &Choices {
    match &doc.body {
        DocBody::Choices(c) => c,
        other => panic!("expected a multiple-choice doc, got {other:?}"),
    }
}

fn load_text(text: &str) -> Result<TaskData, TaskError> {
    let dir = tempfile::tempdir().unwrap();
    load(&write(dir.path(), "t.jsonl", text))
}

#[test]
fn requests_are_grouped_by_doc_with_choices_in_idx_order() {
    let ctx = "Question: What is two?\nAnswer:";
    let text = lines(&[
        request(0, 2, json!(1), ctx, " five"),
        request(0, 0, json!(1), ctx, " three"),
        request(1, 1, json!(0), "Q2", " b"),
        request(0, 1, json!(1), ctx, " four"),
        request(1, 0, json!(0), "Q2", " a"),
    ]);
    let data = load_text(&text).unwrap();
    assert_eq!(data.format, TaskFormat::Requests);
    assert_eq!(data.docs.len(), 2);
    let d0 = &data.docs[0];
    assert_eq!((d0.id.as_str(), d0.line), ("0", 1));
    let c0 = choices(d0);
    assert_eq!(c0.choices, [" three", " four", " five"]);
    assert_eq!(c0.gold, Some(1));
    assert_eq!(c0.context, Context::Shared(ctx.to_string()));
    assert_eq!(c0.native_id.as_deref(), Some("Q0"));
    assert_eq!(c0.uncond_context, None);
    let d1 = &data.docs[1];
    assert_eq!((d1.id.as_str(), d1.line), ("1", 3));
    assert_eq!(choices(d1).choices, [" a", " b"]);
    assert_eq!(choices(d1).gold, Some(0));
}

#[test]
fn requests_with_a_context_per_choice_keep_each_context() {
    // Winogrande's partial scoring: the option goes into the context, the continuation is shared.
    let text = lines(&[
        request(7, 0, json!(1), "Sarah beat Maria so Sarah", " won."),
        request(7, 1, json!(1), "Sarah beat Maria so Maria", " won."),
    ]);
    let data = load_text(&text).unwrap();
    let c = choices(&data.docs[0]);
    assert_eq!(
        c.context,
        Context::PerChoice(vec![
            "Sarah beat Maria so Sarah".to_string(),
            "Sarah beat Maria so Maria".to_string()
        ])
    );
    assert_eq!(c.context(1), "Sarah beat Maria so Maria");
    assert_eq!(c.choices, [" won.", " won."]);
}

#[test]
fn unconditional_requests_fold_into_their_doc() {
    let text = lines(&[
        request(0, 0, json!(0), "Q: x\nAnswer:", " a"),
        request(0, 1, json!(0), "Q: x\nAnswer:", " b"),
        request(1_000_000, 0, json!(0), "Answer:", " a"),
        request(1_000_000, 1, json!(0), "Answer:", " b"),
        // Different continuations: not the unconditional twin of doc 1, kept as a doc.
        request(1, 0, json!(0), "Q: y\nAnswer:", " c"),
        request(1_000_001, 0, json!(0), "Answer:", " other"),
    ]);
    let data = load_text(&text).unwrap();
    let ids: Vec<&str> = data.docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["0", "1", "1000001"]);
    assert_eq!(
        choices(&data.docs[0]).uncond_context.as_deref(),
        Some("Answer:")
    );
    assert_eq!(choices(&data.docs[1]).uncond_context, None);
}

#[test]
fn gold_comes_from_label_then_doc_gold_then_a_single_continuation() {
    let no_label = |doc_id: u64, idx: u64, gold: serde_json::Value| {
        json!({"request": {"context": "c", "continuation": format!(" {idx}")},
               "doc_id": doc_id, "idx": idx, "doc": {"gold": gold}})
        .to_string()
    };
    let text = lines(&[
        no_label(0, 0, json!(1)),
        no_label(0, 1, json!(1)),
        no_label(1, 0, json!(null)),
        no_label(1, 1, json!(null)),
        // A gold_bpb-style doc: one reference continuation, a string label.
        request(
            2,
            0,
            json!("18"),
            "Question: ...\nAnswer:",
            " So the answer is 18.",
        ),
    ]);
    let data = load_text(&text).unwrap();
    let golds: Vec<Option<usize>> = data.docs.iter().map(|d| choices(d).gold).collect();
    assert_eq!(golds, [Some(1), None, Some(0)]);
}

#[test]
fn inconsistent_requests_name_the_line() {
    let dup = lines(&[
        request(0, 0, json!(0), "c", " a"),
        request(0, 0, json!(0), "c", " b"),
    ]);
    match load_text(&dup) {
        Err(TaskError::DuplicateChoice {
            line: 2,
            idx: 0,
            doc_id,
            ..
        }) => assert_eq!(doc_id, "0"),
        other => panic!("{other:?}"),
    }
    let gap = lines(&[
        request(0, 0, json!(0), "c", " a"),
        request(5, 0, json!(0), "c", " a"),
        request(5, 2, json!(0), "c", " b"),
    ]);
    match load_text(&gap) {
        Err(TaskError::ChoiceGap {
            line: 2, indices, ..
        }) => assert_eq!(indices, [0, 2]),
        other => panic!("{other:?}"),
    }
    let out_of_range = lines(&[
        request(0, 0, json!(0), "c", " a"),
        request(3, 0, json!(2), "c", " a"),
        request(3, 1, json!(2), "c", " b"),
    ]);
    assert!(matches!(
        load_text(&out_of_range),
        Err(TaskError::GoldOutOfRange {
            line: 2,
            gold: 2,
            choices: 2,
            ..
        })
    ));
    let labels = lines(&[
        request(0, 0, json!(0), "c", " a"),
        request(0, 1, json!(1), "c", " b"),
    ]);
    assert!(matches!(
        load_text(&labels),
        Err(TaskError::LabelMismatch { line: 2, .. })
    ));
}

#[test]
fn gzip_is_told_by_its_magic_bytes_not_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n";
    let gz_named_plain = write_gz(dir.path(), "a.jsonl", text);
    let plain_named_gz = write(dir.path(), "b.jsonl.gz", text);
    for path in [&gz_named_plain, &plain_named_gz] {
        let data = load(path).unwrap();
        assert_eq!(data.format, TaskFormat::Text);
        assert_eq!(data.docs.len(), 2);
        assert_eq!(data.docs[1].body, DocBody::Text("world".to_string()));
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(data.sha256, hex(&Sha256::digest(&bytes)));
        assert_eq!(data.sha256.len(), 64);
    }
    assert_ne!(
        load(&gz_named_plain).unwrap().sha256,
        load(&plain_named_gz).unwrap().sha256
    );
}

#[test]
fn a_corrupt_gzip_stream_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gz(dir.path(), "c.jsonl.gz", "{\"text\": \"hello\"}\n");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(&path), Err(TaskError::Io { .. })));
}

#[test]
fn text_lines_take_ids_or_line_numbers() {
    let data = load_text("\u{feff}{\"text\": \"a b\"}\r\n\n  \n{\"text\": \"c\", \"id\": \"doc-c\"}\n{\"text\": \"d\", \"id\": 42}").unwrap();
    assert_eq!(data.format, TaskFormat::Text);
    let ids: Vec<(&str, usize)> = data.docs.iter().map(|d| (d.id.as_str(), d.line)).collect();
    assert_eq!(ids, [("1", 1), ("doc-c", 4), ("42", 5)]);
    assert_eq!(data.docs[0].body, DocBody::Text("a b".to_string()));
}

#[test]
fn chat_and_prompt_lines_parse() {
    let data = load_text(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\", \"extra\": 1}]}\n",
    )
    .unwrap();
    assert_eq!(data.format, TaskFormat::Chat);
    let DocBody::Chat(messages) = &data.docs[0].body else {
        panic!()
    };
    assert_eq!(messages[1].role, "assistant");
    assert_eq!(messages[1].content, "Hello");

    let no_assistant = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n";
    assert!(matches!(
        load_text(no_assistant),
        Err(TaskError::NoAssistant { line: 1, .. })
    ));

    let data =
        load_text("{\"prompt\": \"2+2=\"}\n{\"prompt\": \"3+3=\", \"id\": \"b\"}\n").unwrap();
    assert_eq!(data.format, TaskFormat::Prompts);
    assert_eq!(
        data.docs[1].body,
        DocBody::Prompt {
            prompt: "3+3=".to_string(),
            target: None
        }
    );
}

#[test]
fn malformed_lines_name_the_file_and_line() {
    let err = load_text("{\"text\": \"a\"}\n\n{\"text\": \"b\"\n").unwrap_err();
    assert!(matches!(err, TaskError::Json { line: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("t.jsonl:3:"), "{err}");

    let err = load_text("{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap_err();
    assert!(
        matches!(
            err,
            TaskError::Mismatch {
                line: 2,
                format: TaskFormat::Text,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(r#"{"text": string}"#), "{err}");

    let err = load_text("{\"text\": 5}\n").unwrap_err();
    assert!(
        matches!(err, TaskError::Mismatch { line: 1, .. }),
        "{err:?}"
    );

    let err = load_text(&lines(&[
        request(0, 0, json!(0), "c", " a"),
        json!({"request": {"context": "c"}, "doc_id": 1, "idx": 0}).to_string(),
    ]))
    .unwrap_err();
    assert!(
        matches!(
            err,
            TaskError::Mismatch {
                line: 2,
                format: TaskFormat::Requests,
                ..
            }
        ),
        "{err:?}"
    );

    let err = load_text("\n{\"question\": \"a\", \"answer\": \"b\"}\n").unwrap_err();
    assert!(
        matches!(err, TaskError::UnknownFormat { line: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("[question, answer]"), "{err}");

    let err = load_text("[1, 2]\n").unwrap_err();
    assert!(
        matches!(err, TaskError::UnknownFormat { line: 1, ref found, .. } if found == "an array")
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n").unwrap();
    assert!(matches!(
        load(&path),
        Err(TaskError::NotUtf8 { line: 2, .. })
    ));
}

#[test]
fn an_empty_file_is_an_error() {
    for text in ["", "\n\n  \n"] {
        let err = load_text(text).unwrap_err();
        assert!(matches!(err, TaskError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("empty"));
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load(&dir.path().join("missing.jsonl")),
        Err(TaskError::Io { .. })
    ));
}

#[test]
fn an_overlong_line_is_refused() {
    let mut text = String::from("{\"text\": \"a\"}\n{\"text\": \"");
    text.push_str(&"x".repeat(MAX_LINE_BYTES));
    text.push_str("\"}\n");
    let err = load_text(&text).unwrap_err();
    assert!(
        matches!(err, TaskError::LineTooLong { line: 2, .. }),
        "{err:?}"
    );
}

fn text_docs(n: usize) -> Vec<Doc> {
    (0..n)
        .map(|i| Doc {
            id: format!("doc{i}"),
            line: i + 1,
            body: DocBody::Text(String::new()),
        })
        .collect()
}

#[test]
fn the_split_is_deterministic_disjoint_and_nested() {
    let docs = text_docs(100);
    let (fit, held) = split(&docs, 30, 7);
    assert_eq!(fit.len(), 30);
    assert_eq!(held.len(), 70);
    assert_eq!(split(&docs, 30, 7), (fit.clone(), held.clone()));
    let mut all: Vec<usize> = fit.iter().chain(&held).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert!(fit.windows(2).all(|w| w[0] < w[1]));

    // A smaller fit set is part of a larger one; another seed picks other docs.
    let (fit10, _) = split(&docs, 10, 7);
    assert!(fit10.iter().all(|i| fit.contains(i)));
    assert_ne!(split(&docs, 30, 8).0, fit);

    // Reordering the docs keeps each doc on its side.
    let reversed: Vec<Doc> = docs.iter().rev().cloned().collect();
    let (fit_rev, _) = split(&reversed, 30, 7);
    let mut ids: Vec<&str> = fit_rev.iter().map(|&i| reversed[i].id.as_str()).collect();
    let mut expected: Vec<&str> = fit.iter().map(|&i| docs[i].id.as_str()).collect();
    ids.sort_unstable();
    expected.sort_unstable();
    assert_eq!(ids, expected);

    let (all_fit, none) = split(&docs[..5], 50, 1);
    assert_eq!((all_fit, none), (vec![0, 1, 2, 3, 4], vec![]));
    assert_eq!(split(&[], 3, 1), (vec![], vec![]));
}

#[test]
fn the_three_splits_are_disjoint_complete_and_deterministic_by_seed() {
    let docs = text_docs(100);
    let [fit, validation, test] = split_three(&docs, 20, 30, 7);
    assert_eq!((fit.len(), validation.len(), test.len()), (20, 30, 50));
    let mut all: Vec<usize> = fit
        .iter()
        .chain(&validation)
        .chain(&test)
        .copied()
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>(), "disjoint and complete");
    // the fit part is the fit's own split, so plans and the budget run agree on it
    assert_eq!(fit, split(&docs, 20, 7).0);
    assert_eq!(
        split_three(&docs, 20, 30, 7),
        [fit.clone(), validation.clone(), test]
    );
    let other = split_three(&docs, 20, 30, 8);
    assert_ne!(other[0], fit);
    assert_ne!(other[1], validation);
    // fewer documents than asked: validation takes what the fit leaves, the test part is empty
    let [f, v, t] = split_three(&docs[..10], 4, 30, 7);
    assert_eq!((f.len(), v.len(), t.len()), (4, 6, 0));
}

const WORDS: &[&str] = &[
    "[UNK]",
    "<s>",
    "<|im_start|>",
    "<|im_end|>",
    "\n",
    " ",
    "Question",
    ":",
    " What",
    " is",
    " two",
    "?",
    "Answer",
    " four",
    "four",
    " five",
    "user",
    "assistant",
    "system",
    "Hi",
    "Hello",
    " there",
    "!",
    " won",
    ".",
    "Sarah",
    " so",
    " Sarah",
    " Maria",
    " the",
    " end",
    "a",
    " b",
];

/// A word-level tokenizer whose pieces keep their leading space, so moving whitespace between
/// context and continuation shows in the ids.
fn tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = WORDS[..4]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": " ?[A-Za-z]+| ?[^A-Za-z\\s]|\\s"},
            "behavior": "Isolated",
            "invert": false
        },
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    Tokenizer::from_str(&json.to_string()).unwrap()
}

fn id(word: &str) -> u32 {
    WORDS.iter().position(|w| *w == word).unwrap() as u32
}

fn ids(words: &[&str]) -> Vec<u32> {
    words.iter().map(|w| id(w)).collect()
}

fn data(format: TaskFormat, docs: Vec<Doc>) -> TaskData {
    TaskData {
        path: PathBuf::from("mem.jsonl"),
        format,
        docs,
        sha256: String::new(),
    }
}

fn choice_doc(id: &str, context: Context, choices: &[&str], gold: Option<usize>) -> Doc {
    Doc {
        id: id.to_string(),
        line: 1,
        body: DocBody::Choices(Choices {
            native_id: None,
            context,
            choices: choices.iter().map(|c| c.to_string()).collect(),
            gold,
            uncond_context: None,
        }),
    }
}

const BOS: u32 = 1;

#[test]
fn request_examples_target_the_gold_continuation() {
    let tok = tokenizer();
    let d = data(
        TaskFormat::Requests,
        vec![
            choice_doc(
                "0",
                Context::Shared("Question: What is two?\nAnswer:".to_string()),
                &[" five", " four"],
                Some(1),
            ),
            // The context's trailing space moves to the continuation: "four" becomes " four".
            choice_doc(
                "1",
                Context::Shared("Answer: ".to_string()),
                &["five", "four"],
                Some(1),
            ),
            choice_doc(
                "2",
                Context::PerChoice(vec![
                    "Sarah so Sarah".to_string(),
                    "Sarah so Maria".to_string(),
                ]),
                &[" won.", " won."],
                Some(1),
            ),
        ],
    );
    let ex = examples(&d, &[0, 1, 2], &tok, None, Some(BOS), 64)
        .unwrap()
        .examples;
    assert_eq!(ex[0].doc_id, "0");
    assert_eq!(
        ex[0].tokens,
        ids(&["<s>", "Question", ":", " What", " is", " two", "?", "\n", "Answer", ":", " four"])
    );
    let mut mask = vec![false; 10];
    mask.push(true);
    assert_eq!(ex[0].target_mask, mask);

    assert_eq!(ex[1].tokens, ids(&["<s>", "Answer", ":", " four"]));
    assert_eq!(ex[1].target_mask, [false, false, false, true]);

    assert_eq!(
        ex[2].tokens,
        ids(&["<s>", "Sarah", " so", " Maria", " won", "."])
    );
    assert_eq!(ex[2].target_mask, [false, false, false, false, true, true]);

    let no_bos = examples(&d, &[1], &tok, None, None, 64).unwrap().examples;
    assert_eq!(no_bos[0].tokens, ids(&["Answer", ":", " four"]));
    assert_eq!(no_bos[0].target_mask, [false, false, true]);

    let no_gold = data(
        TaskFormat::Requests,
        vec![choice_doc(
            "9",
            Context::Shared("a".to_string()),
            &[" b", " b"],
            None,
        )],
    );
    assert!(matches!(
        examples(&no_gold, &[0], &tok, None, None, 64),
        Err(TaskError::NoGold { .. })
    ));
    assert!(matches!(
        examples(&d, &[3], &tok, None, None, 64),
        Err(TaskError::IndexOutOfRange { index: 3, docs: 3 })
    ));
}

#[test]
fn choice_examples_make_one_sequence_per_choice_of_each_doc() {
    let tok = tokenizer();
    let d = data(
        TaskFormat::Requests,
        vec![
            choice_doc(
                "0",
                Context::Shared("Answer: ".to_string()),
                &["five", "four", "two"],
                Some(1),
            ),
            // No gold choice: the choice objective does not need one.
            choice_doc(
                "1",
                Context::PerChoice(vec![
                    "Sarah so Sarah".to_string(),
                    "Sarah so Maria".to_string(),
                ]),
                &[" won.", " won."],
                None,
            ),
        ],
    );
    let groups = choice_examples(&d, &[1, 0], &tok, Some(BOS), 64)
        .unwrap()
        .examples;
    assert_eq!(groups.len(), 2);
    let tokens = |g: &[Example]| g.iter().map(|e| e.tokens.clone()).collect::<Vec<_>>();
    let masks = |g: &[Example]| g.iter().map(|e| e.target_mask.clone()).collect::<Vec<_>>();
    assert_eq!(
        tokens(&groups[0]),
        [
            ids(&["<s>", "Sarah", " so", " Sarah", " won", "."]),
            ids(&["<s>", "Sarah", " so", " Maria", " won", "."]),
        ]
    );
    let won = vec![false, false, false, false, true, true];
    assert_eq!(masks(&groups[0]), [won.clone(), won]);
    assert!(groups[0].iter().all(|e| e.doc_id == "1"));
    // each choice as `examples` makes the gold one: trailing space moved, targets on it
    assert_eq!(
        tokens(&groups[1]),
        [
            ids(&["<s>", "Answer", ":", " five"]),
            ids(&["<s>", "Answer", ":", " four"]),
            ids(&["<s>", "Answer", ":", " two"]),
        ]
    );
    assert_eq!(
        examples(&d, &[0], &tok, None, Some(BOS), 64)
            .unwrap()
            .examples[0],
        groups[1][1]
    );
    assert_eq!(groups[1][2].target_mask, [false, false, false, true]);

    let text = data(
        TaskFormat::Text,
        vec![Doc {
            id: "t".to_string(),
            line: 7,
            body: DocBody::Text("Hello there!".to_string()),
        }],
    );
    let err = choice_examples(&text, &[0], &tok, None, 64).unwrap_err();
    assert!(matches!(err, TaskError::NotChoices { line: 7, .. }));
    assert!(err
        .to_string()
        .contains("doc t (line 7) is not a multiple-choice request"));
    assert!(matches!(
        choice_examples(&d, &[2], &tok, None, 64),
        Err(TaskError::IndexOutOfRange { index: 2, docs: 2 })
    ));
}

#[test]
fn text_examples_target_every_token_after_the_first() {
    let tok = tokenizer();
    let d = data(
        TaskFormat::Text,
        vec![Doc {
            id: "t".to_string(),
            line: 1,
            body: DocBody::Text("Hello there!".to_string()),
        }],
    );
    let ex = examples(&d, &[0], &tok, None, None, 64).unwrap().examples;
    assert_eq!(ex[0].tokens, ids(&["Hello", " there", "!"]));
    assert_eq!(ex[0].target_mask, [false, true, true]);
    let ex = examples(&d, &[0], &tok, None, Some(BOS), 64)
        .unwrap()
        .examples;
    assert_eq!(ex[0].tokens, ids(&["<s>", "Hello", " there", "!"]));
    assert_eq!(ex[0].target_mask, [false, true, true, true]);
    // Too long: cut from the right, BOS kept.
    let ex = examples(&d, &[0], &tok, None, Some(BOS), 3)
        .unwrap()
        .examples;
    assert_eq!(ex[0].tokens, ids(&["<s>", "Hello", " there"]));
    assert_eq!(ex[0].target_mask, [false, true, true]);

    let single = data(
        TaskFormat::Text,
        vec![Doc {
            id: "s".to_string(),
            line: 1,
            body: DocBody::Text("Hello".to_string()),
        }],
    );
    assert!(matches!(
        examples(&single, &[0], &tok, None, None, 64),
        Err(TaskError::NoTargets { .. })
    ));
    assert!(matches!(
        examples(&single, &[0], &tok, None, None, 1),
        Err(TaskError::MaxLenTooSmall { max_len: 1 })
    ));
}

#[test]
fn truncation_drops_context_from_the_left_then_the_continuation_from_the_right() {
    let tok = tokenizer();
    let d = data(
        TaskFormat::Requests,
        vec![
            choice_doc(
                "0",
                Context::Shared("Question: What is two?\nAnswer:".to_string()),
                &[" four"],
                Some(0),
            ),
            choice_doc(
                "1",
                Context::Shared("Answer:".to_string()),
                &[" the end the end"],
                Some(0),
            ),
        ],
    );
    let ex = examples(&d, &[0, 1], &tok, None, Some(BOS), 4)
        .unwrap()
        .examples;
    assert_eq!(ex[0].tokens, ids(&["<s>", "Answer", ":", " four"]));
    assert_eq!(ex[0].target_mask, [false, false, false, true]);
    // The continuation alone overflows: one context token stays before it.
    assert_eq!(ex[1].tokens, ids(&["<s>", ":", " the", " end"]));
    assert_eq!(ex[1].target_mask, [false, false, true, true]);
}

/// SmolLM2-Instruct's template, as its GGUF carries it.
const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A ChatML template without a default system prompt, that strips message text in Python style.
const CHATML: &str = "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.to_string(),
        content: content.to_string(),
    }
}

#[test]
fn chat_examples_target_the_assistant_turns_only() {
    let tok = tokenizer();
    let chat = ChatTemplate::new(CHATML, "<s>", "<|im_end|>").unwrap();
    let d = data(
        TaskFormat::Chat,
        vec![Doc {
            id: "c".to_string(),
            line: 1,
            body: DocBody::Chat(vec![
                message("user", "  Hi "),
                message("assistant", "Hello!"),
                message("user", "What is two?"),
                message("assistant", "four"),
            ]),
        }],
    );
    // The template prints BOS itself: it is not doubled.
    let ex = examples(&d, &[0], &tok, Some(&chat), Some(BOS), 64)
        .unwrap()
        .examples;
    let expected: Vec<(&str, bool)> = vec![
        ("<s>", false),
        ("<|im_start|>", false),
        ("user", false),
        ("\n", false),
        ("Hi", false),
        ("<|im_end|>", false),
        ("\n", false),
        ("<|im_start|>", false),
        ("assistant", false),
        ("\n", false),
        ("Hello", true),
        ("!", true),
        ("<|im_end|>", true),
        ("\n", true),
        ("<|im_start|>", false),
        ("user", false),
        ("\n", false),
        ("What", false), // "What" is not in the vocabulary without its space
        (" is", false),
        (" two", false),
        ("?", false),
        ("<|im_end|>", false),
        ("\n", false),
        ("<|im_start|>", false),
        ("assistant", false),
        ("\n", false),
        ("four", true),
        ("<|im_end|>", true),
        ("\n", true),
    ];
    let tokens: Vec<u32> = expected
        .iter()
        .map(|(w, _)| tok.token_to_id(w).unwrap_or(0))
        .collect();
    let mask: Vec<bool> = expected.iter().map(|(_, m)| *m).collect();
    assert_eq!(ex[0].tokens, tokens);
    assert_eq!(ex[0].target_mask, mask);

    // The SmolLM template adds a system prompt when there is none; the targets are the same.
    let smol = ChatTemplate::new(SMOL_TEMPLATE, "", "").unwrap();
    let ex = examples(&d, &[0], &tok, Some(&smol), None, 256)
        .unwrap()
        .examples;
    let targets: Vec<u32> = ex[0]
        .tokens
        .iter()
        .zip(&ex[0].target_mask)
        .filter_map(|(&t, &m)| m.then_some(t))
        .collect();
    assert_eq!(
        targets,
        ids(&["Hello", "!", "<|im_end|>", "\n", "four", "<|im_end|>", "\n"])
    );

    assert!(matches!(
        examples(&d, &[0], &tok, None, None, 64),
        Err(TaskError::NoChatTemplate { .. })
    ));
}

#[test]
fn chat_templates_that_are_not_prefix_stable_or_fail_are_errors() {
    let tok = tokenizer();
    let d = data(
        TaskFormat::Chat,
        vec![Doc {
            id: "c".to_string(),
            line: 1,
            body: DocBody::Chat(vec![message("user", "Hi"), message("assistant", "Hello")]),
        }],
    );
    let unstable = ChatTemplate::new(
        "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m.content }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert!(matches!(
        examples(&d, &[0], &tok, Some(&unstable), None, 64),
        Err(TaskError::TemplateNotPrefixStable { message: 1, .. })
    ));
    let raising = ChatTemplate::new(
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users here') }}{% endif %}",
        "",
        "",
    )
    .unwrap();
    let err = examples(&d, &[0], &tok, Some(&raising), None, 64).unwrap_err();
    assert!(
        matches!(
            err,
            TaskError::TemplateRender {
                doc_id: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no users here"), "{err}");
    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(TaskError::TemplateSyntax { .. })
    ));
}

#[test]
fn templates_get_python_string_and_dict_methods() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.content.lstrip('x').rstrip() }}|{{ m.content.startswith('xx') }}|\
         {{ m.content.split(' ') | length }}|{{ '-'.join(['a', 'b']) }}|{{ m.get('role') }}|\
         {{ m.get('name', 'anon') }}|{% for k, v in m.items() %}{{ k }}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let out = t.render(&[message("user", "xxhi there  ")], false).unwrap();
    assert_eq!(out, "hi there|True|4|a-b|user|anon|rolecontent");
}

#[test]
fn prompt_examples_need_a_target_and_follow_the_prompt_verbatim() {
    let tok = tokenizer();
    let mut d = data(
        TaskFormat::Prompts,
        vec![Doc {
            id: "p".to_string(),
            line: 1,
            body: DocBody::Prompt {
                prompt: "What is two? ".to_string(),
                target: None,
            },
        }],
    );
    assert!(matches!(
        examples(&d, &[0], &tok, None, None, 64),
        Err(TaskError::MissingTarget { .. })
    ));
    if let DocBody::Prompt { target, .. } = &mut d.docs[0].body {
        *target = Some("four".to_string());
    }
    let ex = examples(&d, &[0], &tok, None, None, 64).unwrap().examples;
    assert_eq!(
        ex[0].tokens,
        ids(&["[UNK]", " is", " two", "?", " ", "four"])
    );
    assert_eq!(ex[0].target_mask, [false, false, false, false, false, true]);

    let chat = ChatTemplate::new(CHATML, "<s>", "").unwrap();
    assert_eq!(
        prompt_context("Hi", Some(&chat)).unwrap(),
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ex = examples(&d, &[0], &tok, Some(&chat), Some(BOS), 64)
        .unwrap()
        .examples;
    assert_eq!(ex[0].tokens[0], BOS);
    assert_eq!(ex[0].tokens[1], id("<|im_start|>"));
    assert_eq!(*ex[0].tokens.last().unwrap(), id("four"));
    assert_eq!(ex[0].target_mask.iter().filter(|&&m| m).count(), 1);
}

#[test]
fn trailing_whitespace_moves_as_lm_eval_moves_it() {
    assert_eq!(
        move_trailing_whitespace("Answer: ", "B"),
        ("Answer:", " B".to_string())
    );
    assert_eq!(
        move_trailing_whitespace("Answer:\n\n", "B"),
        ("Answer:", "\n\nB".to_string())
    );
    assert_eq!(
        move_trailing_whitespace("Answer:", " B"),
        ("Answer:", " B".to_string())
    );
}

/// The cache folder scripts/fetch-tasks.sh fills.
fn task_cache() -> PathBuf {
    match std::env::var_os("HOPSCOTCH_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hopscotch")
        }
    }
    .join("tasks")
}

#[test]
#[ignore = "needs the real task files: run scripts/fetch-tasks.sh"]
fn real_task_files_load() {
    let dir = task_cache();
    let arc = dir.join("arc_easy.jsonl.gz");
    assert!(
        arc.exists(),
        "{} is missing: run scripts/fetch-tasks.sh",
        arc.display()
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    files.sort();
    for path in files {
        let data = load(&path).unwrap();
        assert_eq!(data.format, TaskFormat::Requests);
        let mut n_choices = std::collections::BTreeMap::new();
        let mut uncond = 0;
        for doc in &data.docs {
            let c = choices(doc);
            assert!(
                c.gold.is_some_and(|g| g < c.choices.len()),
                "{}: doc {}",
                path.display(),
                doc.id
            );
            *n_choices.entry(c.choices.len()).or_insert(0) += 1;
            uncond += usize::from(c.uncond_context.is_some());
        }
        println!(
            "{}: {} docs, choices per doc {:?}, {} with unconditional context, sha256 {}",
            path.display(),
            data.docs.len(),
            n_choices,
            uncond,
            data.sha256
        );
    }
    let data = load(&arc).unwrap();
    assert!(data.docs.len() > 500);
    let c = choices(&data.docs[0]);
    println!("first doc: {:?}", data.docs[0].id);
    println!(
        "context ends: {:?}",
        &c.context(0)[c.context(0).len().saturating_sub(120)..]
    );
    println!(
        "choices: {:?}, gold {:?}, unconditional {:?}",
        c.choices, c.gold, c.uncond_context
    );
}
