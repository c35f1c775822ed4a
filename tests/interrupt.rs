//! An interrupted conversion (SIGINT) leaves nothing behind: no output, no temporary file.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn sigint_during_conversion_leaves_the_folder_as_it_was() {
    let model = common::real_model();
    let dir = tempfile::tempdir().unwrap();
    let before = listing(dir.path());
    let out = dir.path().join("out.gguf");
    // Writing the f32 intermediate and quantizing it takes seconds; interrupt after one.
    let mut child = Command::new(common::bin())
        .args([
            "convert",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "q8_0",
        ])
        .spawn()
        .unwrap();
    let start = Instant::now();
    // wait until the temporary file appears, so the interrupt lands mid-write
    while listing(dir.path()) == before && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "conversion finished before the interrupt"
    );
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(130), "{code:?}");
    assert_eq!(
        listing(dir.path()),
        before,
        "the interrupted run left files behind"
    );
}
