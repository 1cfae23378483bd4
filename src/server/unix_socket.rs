//! The client Unix socket's file: bind it without taking over another process's
//! socket, and remove it on exit only while it is still ours.
//!
//! A path that exists is a stale socket (nobody accepts on it: connecting is
//! refused), a live one (another process listens there) or not a socket at all.
//! Only the first is removed; the others stop the start with an error. On exit the
//! file is removed only if it is the one we bound (same device and inode): another
//! process may have taken the path over since.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What is at the path before we bind.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    /// A socket file nobody listens on (left by a process that died).
    Stale,
    /// A socket another process accepts on.
    Live,
    /// A regular file, directory, FIFO...
    NotASocket,
}

/// Look at `path` (connecting to it when it is a socket).
pub fn inspect(path: &Path) -> io::Result<Existing> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Ok(Existing::NotASocket);
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(Existing::Live),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(Existing::Stale),
        // Permission denied and the like: not ours to judge, nor to remove.
        Err(e) => Err(e),
    }
}

/// The socket file we created, identified by device, inode and change time (an
/// inode number is reused at once when a file is removed and another created). A
/// file put in its place within the same clock tick (a few ms) on the same inode
/// would still pass for ours.
#[derive(Debug, Clone)]
pub struct OwnedSocket {
    path: PathBuf,
    id: FileId,
}

type FileId = (u64, u64, i64, i64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

/// Bind `path` as described in the module comment.
pub fn bind(path: &Path) -> io::Result<(tokio::net::UnixListener, OwnedSocket)> {
    match inspect(path)? {
        Existing::Nothing => {}
        Existing::Stale => std::fs::remove_file(path)?,
        Existing::Live => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on this socket; not taking it over \
                 (stop it, or choose another listen.unix_socket)",
            ))
        }
        Existing::NotASocket => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not removing it",
            ))
        }
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((
        listener,
        OwnedSocket {
            path: path.to_path_buf(),
            id: file_id(&meta),
        },
    ))
}

impl OwnedSocket {
    /// Remove the file if it is still the one we bound. Returns whether it did.
    pub fn remove(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if file_id(&m) == self.id => std::fs::remove_file(&self.path).is_ok(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_live_socket_of_another_process_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(inspect(&path).unwrap(), Existing::Live);
        let e = bind(&path).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("another process"), "{e}");
        // Still theirs: a client reaches their listener.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        theirs.accept().unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert_eq!(inspect(&path).unwrap(), Existing::Stale);
        let (_l, owned) = bind(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(owned.remove());
        assert_eq!(inspect(&path).unwrap(), Existing::Nothing);

        let file = dir.path().join("plain");
        std::fs::write(&file, "data").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }

    #[tokio::test]
    async fn on_exit_only_our_own_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (l, owned) = bind(&path).unwrap();
        drop(l);
        // Another process took the path over after us (later than one tick of the
        // file system's clock: see `OwnedSocket`).
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!owned.remove());
        assert_eq!(inspect(&path).unwrap(), Existing::Live);
    }
}
