//! File writes that never leave a half-written file under a real name, and the check that a
//! command's output is not one of its own inputs.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    sync_and_rename(&tmp, path)
}

/// Flushes `tmp` to disk and renames it to `dst` (atomic on one filesystem).
pub fn sync_and_rename(tmp: &Path, dst: &Path) -> Result<()> {
    let f = std::fs::File::open(tmp).map_err(|e| Error::io(tmp, e))?;
    f.sync_all().map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, dst).map_err(|e| Error::io(dst, e))
}

/// The absolute, symlink-free form of a path that may not exist yet (its parent must, for the
/// comparison to see through links; otherwise the path is taken as given).
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize()
                .map(|d| d.join(name))
                .unwrap_or_else(|_| p.to_path_buf())
        }
        _ => p.to_path_buf(),
    }
}

/// Refuses an output path that is one of the command's `inputs` (e.g. `tern export --out
/// CKPT/model.safetensors` would replace the checkpoint's weights with the GGUF). `flag` names
/// the option in the error.
pub fn ensure_not_an_input(out: &Path, inputs: &[PathBuf], flag: &str) -> Result<()> {
    let target = resolved(out);
    match inputs.iter().find(|i| resolved(i) == target) {
        Some(i) => Err(Error::Msg(format!(
            "{flag} {}: that is one of this command's inputs ({}); writing it would destroy it. Choose another path",
            out.display(),
            i.display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_equal_to_an_input_is_refused_even_through_another_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("model.safetensors");
        std::fs::write(&input, b"weights").unwrap();
        let other = dir.path().join("sub/../model.safetensors");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let err = ensure_not_an_input(&other, std::slice::from_ref(&input), "--out")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--out") && err.contains("inputs"), "{err}");
        assert!(ensure_not_an_input(&dir.path().join("model.gguf"), &[input], "--out").is_ok());
    }
}
