//! Cross-process locks.
//!
//! * The writer lock (`flock` on `<store>/lock`) serialises import, rm and gc:
//!   gc must never collect the objects of an import that has not committed yet.
//!   The kernel drops it when the holder dies, so `kill -9` leaves no stale lock.
//! * Object locks (open file description locks, `F_OFD_SETLK`) let readers say
//!   "I have this object open": a reader holds a shared lock on every object it
//!   reads from, and gc punches holes only in objects it can lock exclusively.
//!   Unlinking needs no lock: an unlinked file stays readable through open
//!   descriptors.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Held while a process may modify the store. Released on drop or death.
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Take the writer lock, waiting for another writer if there is one.
    /// `on_wait` is called once if the lock is busy, so the CLI can say why it waits.
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> Result<WriterLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .at(path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .at(path)?;
        }
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).at(path);
            }
            on_wait();
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(io::Error::last_os_error()).at(path);
            }
        }
        Ok(WriterLock { _file: file })
    }
}

fn ofd_lock(file: &File, lock_type: libc::c_int, cmd: libc::c_int) -> io::Result<()> {
    // SAFETY: zeroed flock is a valid value; we set the fields that matter.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = lock_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // whole file, including any future growth
                  // SAFETY: fcntl with a valid fd and a pointer to a live flock struct.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Declare that this open file description reads the object (blocks while gc
/// is punching holes in it). Released when the file is closed.
pub fn share_object(file: &File) -> io::Result<()> {
    ofd_lock(file, libc::F_RDLCK, libc::F_OFD_SETLKW)
}

/// Try to take an object for exclusive modification (hole punching).
/// Ok(false) if some reader holds it.
pub fn try_own_object(file: &File) -> io::Result<bool> {
    match ofd_lock(file, libc::F_WRLCK, libc::F_OFD_SETLK) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_lock_blocks_owner_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("obj");
        std::fs::write(&p, b"data").unwrap();
        let reader = File::open(&p).unwrap();
        share_object(&reader).unwrap();
        let gc = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert!(!try_own_object(&gc).unwrap());
        drop(reader);
        assert!(try_own_object(&gc).unwrap());
    }
}
