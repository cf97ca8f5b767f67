//! Files that hold money or secrets: the data dir is 0700; the SQLite files, the node seed,
//! the admin token and TLS keys are 0600. The server refuses to start when a secret is
//! readable by group or others, and says what to chmod.

use std::fs::{OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) and makes it 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
}

/// Writes `bytes` to a new or truncated file of mode 0600, durably.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes an existing file 0600 (the SQLite files, which SQLite creates 0644).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("{what} {path} is readable by {who} (mode {mode:o}): run `chmod 600 {path}` (and keep it secret)")]
pub struct ExposedSecret {
    pub what: &'static str,
    pub path: String,
    pub who: &'static str,
    pub mode: u32,
}

/// Refuses a secret file that group or others can read (a missing one is fine: it will be
/// created private).
pub fn check_private(path: &Path, what: &'static str) -> Result<(), ExposedSecret> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ExposedSecret {
            what,
            path: path.display().to_string(),
            who: if mode & 0o007 != 0 {
                "others"
            } else {
                "its group"
            },
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_and_the_refusal_message() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_private(&p, b"x").unwrap();
        assert!(check_private(&p, "seed").is_ok());
        std::fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        let e = check_private(&p, "seed").unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(e.to_string().contains("others"), "{e}");
        write_private(&p, b"y").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(check_private(&dir.path().join("missing"), "seed").is_ok());
    }
}
