//! Whole-or-nothing output files: write to a temporary file in the target folder, rename at the end.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Errors creating or committing an output file.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output exists and `--force` was not given.
    #[error("{0} already exists (pass --force to overwrite it)")]
    Exists(PathBuf),
    /// An I/O error on the output or its temporary file.
    #[error("writing {path}: {source}")]
    Io {
        /// The final output path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// A file being written under a temporary name next to its final path. Dropped without
/// [`AtomicFile::commit`], it removes the temporary file, so a failed run leaves nothing behind.
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// Writes `text` to `path` whole or not at all, replacing what is there.
pub fn write_text(path: &Path, text: &str) -> Result<(), OutputError> {
    let mut f = AtomicFile::create(path, true)?;
    f.write_all(text.as_bytes())
        .map_err(|source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    f.commit()
}

/// The size of the file at `path` in bytes; 0 when it cannot be read.
pub fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Checks that `path` may be written: it must not exist unless `force`.
pub fn check_overwrite(path: &Path, force: bool) -> Result<(), OutputError> {
    if !force && path.exists() {
        return Err(OutputError::Exists(path.to_path_buf()));
    }
    Ok(())
}

/// The temporary name used while `target` is written (same folder, so the rename is atomic).
pub fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

impl AtomicFile {
    /// Starts writing `target`; refuses an existing file unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<Self, OutputError> {
        check_overwrite(target, force)?;
        let tmp = temp_path_for(target);
        let file = File::create(&tmp).map_err(|source| OutputError::Io {
            path: target.to_path_buf(),
            source,
        })?;
        crate::output::register_temp(&tmp);
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes, syncs and renames the temporary file onto the target.
    pub fn commit(mut self) -> Result<(), OutputError> {
        let io_err = |source| OutputError::Io {
            path: self.target.clone(),
            source,
        };
        let writer = self.writer.take().expect("writer present until commit");
        let file = writer.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        std::fs::rename(&self.tmp, &self.target).map_err(io_err)?;
        unregister_temp(&self.tmp);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.as_mut().expect("writer present").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("writer present").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
            unregister_temp(&self.tmp);
        }
    }
}

static TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records a temporary file so that an interrupt (Ctrl-C) can remove it; see [`remove_temps`].
pub fn register_temp(path: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.push(path.to_path_buf());
    }
}

/// Forgets a temporary file that was renamed or removed.
pub fn unregister_temp(path: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.retain(|p| p != path);
    }
}

/// Removes every registered temporary file; called from the interrupt handler.
pub fn remove_temps() {
    if let Ok(t) = TEMPS.lock() {
        for p in t.iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}
