//! Importance matrix files: both formats by hand-built bytes and round trips, and the
//! quantizer's values.

use super::*;

/// The legacy format: entry count, then (name length, name, calls, values, f32s) per entry,
/// then the optional chunk count and dataset name.
fn legacy_bytes(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend((entries.len() as i32).to_le_bytes());
    for (name, ncall, values) in entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(ncall.to_le_bytes());
        b.extend((values.len() as i32).to_le_bytes());
        for v in *values {
            b.extend(v.to_le_bytes());
        }
    }
    if let Some((chunks, dataset)) = trailer {
        b.extend(chunks.to_le_bytes());
        b.extend((dataset.len() as i32).to_le_bytes());
        b.extend(dataset.as_bytes());
    }
    b
}

#[test]
fn the_legacy_format_reads_and_its_values_are_divided_by_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.dat");
    let bytes = legacy_bytes(
        &[
            ("blk.0.attn_q.weight", 4, &[4.0, 8.0, 2.0]),
            ("blk.0.ffn_down.weight", 2, &[1.0, 3.0]),
        ],
        Some((10, "wiki.train.raw")),
    );
    std::fs::write(&path, &bytes).unwrap();
    let im = Imatrix::read(&path).unwrap();
    assert_eq!(im.entries.len(), 2);
    assert_eq!(
        im.entries["blk.0.attn_q.weight"].values(),
        vec![1.0, 2.0, 0.5]
    );
    assert_eq!(im.entries["blk.0.ffn_down.weight"].values(), vec![0.5, 1.5]);
    assert_eq!(im.chunk_count, 10);
    assert_eq!(im.datasets, vec!["wiki.train.raw".to_string()]);
    assert_eq!(im.source, path);

    // without the optional trailer
    let bare = legacy_bytes(&[("output.weight", 1, &[7.0])], None);
    std::fs::write(&path, &bare).unwrap();
    let im = Imatrix::read(&path).unwrap();
    assert_eq!(im.entries["output.weight"].values(), vec![7.0]);
    assert_eq!(im.chunk_count, 0);

    // cut inside the second entry's values: an error that says where
    std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    let err = Imatrix::read(&path).unwrap_err();
    assert!(matches!(err, ImatrixFileError::Format { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("old.dat") && msg.contains("ends inside"),
        "{msg}"
    );
    // not an importance matrix at all
    std::fs::write(&path, b"hello").unwrap();
    let msg = Imatrix::read(&path).unwrap_err().to_string();
    assert!(msg.contains("not an importance matrix"), "{msg}");
}

#[test]
fn the_gguf_format_round_trips_and_gives_the_mean_square_per_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("im.gguf");
    let mut im = Imatrix {
        datasets: vec!["task.jsonl (8 documents, seed 0)".into()],
        chunk_count: 8,
        chunk_size: 256,
        ..Default::default()
    };
    im.entries.insert(
        "blk.0.attn_q.weight".into(),
        ImatrixEntry {
            sums: vec![2.0, 4.0, 6.0],
            counts: vec![2.0],
        },
    );
    // two matrices (experts), the second never reached: llama-quantize uses 1 there
    im.entries.insert(
        "blk.0.ffn_down_exps.weight".into(),
        ImatrixEntry {
            sums: vec![3.0, 9.0, 0.0, 0.0],
            counts: vec![3.0, 0.0],
        },
    );
    im.write(&path, false).unwrap();
    let back = Imatrix::read(&path).unwrap();
    assert_eq!(back.entries, im.entries);
    assert_eq!(back.datasets, im.datasets);
    assert_eq!((back.chunk_count, back.chunk_size), (8, 256));
    assert_eq!(
        back.entries["blk.0.attn_q.weight"].values(),
        vec![1.0, 2.0, 3.0]
    );
    assert_eq!(
        back.entries["blk.0.ffn_down_exps.weight"].values(),
        vec![1.0, 3.0, 1.0, 1.0]
    );
    // an existing file is kept without force
    let err = im.write(&path, false).unwrap_err();
    assert!(matches!(err, ImatrixFileError::Write(_)), "{err}");
    im.write(&path, true).unwrap();
}
