//! The database's files are private: created 0600 in 0700 folders whatever the umask, and an
//! existing file others can read is tightened.

use super::*;

fn permissions_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Permissions {
        path: path.display().to_string(),
        source,
    }
}

/// Creates the missing folders of `dir` at [`DIR_MODE`]; folders that exist are left alone.
#[cfg(unix)]
pub(super) fn create_private_dirs(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => {}
            // Made by another process meanwhile: theirs to set.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(permissions_error(d, e)),
        }
        // The umask can only have removed bits, but set the mode exactly all the same.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| permissions_error(d, e))?;
    }
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn create_private_dirs(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| permissions_error(dir, e))
}

/// Creates the database file at [`FILE_MODE`] before SQLite opens it (SQLite would create it
/// 0644 less the umask), or tightens an existing one.
#[cfg(unix)]
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| permissions_error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => tighten(path),
        Err(e) => Err(permissions_error(path, e)),
    }
}

#[cfg(not(unix))]
pub(super) fn create_private_file(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// Takes group and other permissions off an existing file, with a warning; a missing file is
/// fine. Failing to change them (a file of another owner) is only warned about.
#[cfg(unix)]
pub(super) fn tighten(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(permissions_error(path, e)),
    };
    if mode & !FILE_MODE == 0 {
        return Ok(());
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            was = format_args!("{mode:o}"),
            "the database holds signing keys but was readable by others; its mode is now 600"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            mode = format_args!("{mode:o}"),
            error = %e,
            "the database holds signing keys but is readable by others, and its mode cannot be \
             changed: run chmod 600 on it as its owner"
        ),
    }
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn tighten(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}
