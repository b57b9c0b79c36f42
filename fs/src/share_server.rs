//! The mount's end of the layout protocol (docs/store-format.md §11): a Unix
//! socket that answers "where do the bytes of this open file lie" with runs
//! and the objects' descriptors, so processes can map shared tensors from
//! the objects and share their pages.
//!
//! Access rests on the descriptor each request carries, not on who
//! connects: the kernel checked the caller's right to open the file through
//! the mount, and the answer is about that file only. So the socket can be
//! mode 0666, and a process learns nothing of models it cannot open.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use modelfs_share::wire::{Reply, Request, FLAG_PASSTHROUGH};
use modelfs_share::{server_runtime_dir, socket_name, transport};
use tracing::{debug, info, warn};

use crate::vfs::Vfs;

/// The listening socket of a mount; the socket file goes when this does.
pub struct ShareService {
    path: PathBuf,
}

impl ShareService {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShareService {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen for layout requests about files of the mount whose files have
/// device `dev` ("major:minor" as /proc/self/mountinfo spells it), in a
/// thread of its own (and one per connection).
pub fn start(vfs: Arc<Vfs>, dev: &str) -> io::Result<ShareService> {
    let (major, minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| io::Error::other(format!("unexpected device number {dev:?}")))?;
    let device = libc::makedev(major, minor);
    let dir = server_runtime_dir();
    prepare_dir(&dir)?;
    let path = dir.join(socket_name(device));
    let listener = transport::listen(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let service = ShareService { path };
    std::thread::Builder::new()
        .name("share-accept".into())
        .spawn(move || loop {
            match transport::accept(&listener) {
                Ok(conn) => {
                    let vfs = vfs.clone();
                    let spawned = std::thread::Builder::new()
                        .name("share-conn".into())
                        .spawn(move || serve(&vfs, device, conn));
                    if let Err(e) = spawned {
                        warn!("layout service: cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    warn!("layout service: accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })?;
    info!(socket = %service.path.display(), "layout service listening (store-format §11)");
    Ok(service)
}

/// Create the runtime directory (0755) if needed, and refuse one that
/// another user owns or can write: whoever controls it could put their own
/// socket where clients look for ours.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is owned by uid {} or writable by others; refusing to put the layout socket there",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

fn serve(vfs: &Vfs, device: u64, conn: OwnedFd) {
    loop {
        let (bytes, fds) = match transport::recv_request(conn.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                debug!("layout service: {e}");
                let _ = transport::send(conn.as_fd(), &Reply::error(libc::EINVAL).encode(), &[]);
                return;
            }
        };
        let sent = match answer(vfs, device, &bytes, fds) {
            Ok(layout) => {
                let reply = Reply {
                    status: 0,
                    flags: if layout.passthrough {
                        FLAG_PASSTHROUGH
                    } else {
                        0
                    },
                    file_size: layout.file_size,
                    end: layout.end,
                    object_lens: layout.objects.iter().map(|o| o.len()).collect(),
                    runs: layout.runs,
                };
                let fds: Vec<BorrowedFd<'_>> =
                    layout.objects.iter().map(|o| o.file().as_fd()).collect();
                transport::send(conn.as_fd(), &reply.encode(), &fds)
            }
            Err(errno) => {
                vfs.stats.layout_refusals.fetch_add(1, Ordering::Relaxed);
                transport::send(conn.as_fd(), &Reply::error(errno).encode(), &[])
            }
        };
        if let Err(e) = sent {
            debug!("layout service: reply not sent: {e}");
            return;
        }
    }
}

/// The layout a request asks for, or the errno §11 answers with.
fn answer(
    vfs: &Vfs,
    device: u64,
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
) -> Result<crate::vfs::FileLayout, i32> {
    let request = Request::decode(bytes).map_err(|_| libc::EINVAL)?;
    if fds.len() != 1 {
        return Err(libc::EINVAL);
    }
    let fd = fds.pop().expect("one descriptor");
    // SAFETY: fcntl F_GETFL on a descriptor we own reads its flags only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(libc::EBADF);
    }
    let meta = File::from(fd).metadata().map_err(|_| libc::EBADF)?;
    if !meta.file_type().is_file() {
        return Err(libc::EBADF);
    }
    if meta.dev() != device {
        return Err(libc::EXDEV);
    }
    // The kernel shows our inode numbers as st_ino.
    vfs.layout(meta.ino(), request.from)
}
