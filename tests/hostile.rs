//! Hostile inputs that the unit tests of each reader do not cover: non-finite weights stop a
//! fit with the tensor named; forged safetensors headers are refused with the file named.

mod common;

use std::process::Command;

use common::{bin, write_tiny, Tiny};

#[test]
fn a_nan_weight_stops_the_fit_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let st_path = hf.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let victim = owned
        .iter_mut()
        .find(|(n, _, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    victim.2[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &st_path).unwrap();

    let task = dir.path().join("t.jsonl");
    std::fs::write(
        &task,
        "{\"text\": \"It is a truth universally acknowledged.\"}\n".repeat(4),
    )
    .unwrap();
    let plan = dir.path().join("plan.json");
    let o = Command::new(bin())
        .args([
            "fit",
            hf.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--skip",
            "1",
            "--fit-docs",
            "2",
            "-o",
            plan.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("blk.1.ffn_down.weight") && err.contains("non-finite"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert!(!plan.exists());
}

#[test]
fn forged_safetensors_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let st_path = hf.join("model.safetensors");
    let good = std::fs::read(&st_path).unwrap();
    let out = dir.path().join("o.gguf");
    let forged: Vec<Vec<u8>> = vec![
        // a header length far past the end of the file
        [&u64::MAX.to_le_bytes()[..], &good[8..]].concat(),
        // a header that is not JSON
        [&8u64.to_le_bytes()[..], b"not json", &good[8..]].concat(),
        // an offset past the end of the data
        {
            let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
            let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
            let end = good.len() - 8 - n;
            let h2 = header.replacen(&format!("{end}]"), &format!("{}]", end + 4096), 1);
            assert_ne!(h2, header);
            let mut h2 = h2.into_bytes();
            while h2.len() < n {
                h2.push(b' ');
            }
            [&(h2.len() as u64).to_le_bytes()[..], &h2, &good[8 + n..]].concat()
        },
    ];
    for bytes in forged {
        std::fs::write(&st_path, &bytes).unwrap();
        let o = Command::new(bin())
            .args(["convert", hf.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn a_full_disk_gives_an_error_and_no_file() {
    // A 2 MiB tmpfs stands in for a full disk; mounting needs root (as CI runs). Elsewhere the
    // test says so and checks nothing.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=2M",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let out = mnt.join("out.gguf");
    let o = Command::new(bin())
        .args([
            "convert",
            hf.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "f32",
        ])
        .output()
        .unwrap();
    let listing: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    let _ = Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("out.gguf"),
        "{err}"
    );
    assert!(listing.is_empty(), "left behind: {listing:?}");
}
