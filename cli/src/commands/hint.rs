//! Advice printed under an error when the error says what failed but not
//! what to do: "Permission denied" on a store someone else owns means "run
//! as its owner or use your own store", which the system call cannot say.

use std::ffi::CStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What to do about `error` if one of its causes is the store refusing
/// access (EACCES, EPERM, EROFS, or SQLite unable to write the catalog) on a
/// path of the store at `dir`, or on `dir` itself while creating it.
pub fn store_access(error: &anyhow::Error, dir: &Path) -> Option<String> {
    let denied = error
        .chain()
        .find_map(|c| c.downcast_ref::<modelfs_store::Error>()?.denied_path())?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (denied, store) = (abs(denied), abs(dir));
    if !(denied.starts_with(&store) || store.starts_with(&denied)) {
        return None;
    }
    Some(advice(&store, read_only_fs(&store), owner(&store), euid()))
}

/// The advice for the store at `dir`: on a read-only filesystem or not, and
/// owned by `owner` (`None`: it does not exist yet), run by `me`.
fn advice(dir: &Path, read_only: bool, owner: Option<u32>, me: u32) -> String {
    let d = dir.display();
    if read_only {
        return format!(
            "the store {d} is on a read-only filesystem; remount it read-write or pass --store DIR"
        );
    }
    match owner {
        Some(uid) if uid != me => {
            let who = user_name(uid).unwrap_or_else(|| format!("uid {uid}"));
            format!(
                "the store {d} belongs to {who} and is not writable by you; run as its owner \
                 (e.g. sudo -u {who} modelfs ...) or pass --store DIR for a store of your own"
            )
        }
        Some(_) => format!(
            "the store {d} is yours but not writable (check its permissions, e.g. chmod -R u+rwX {d}), \
             or pass --store DIR"
        ),
        None => format!(
            "cannot create a store at {d}: its parent directory is not writable by you; \
             pass --store DIR with a directory you can write"
        ),
    }
}

fn owner(dir: &Path) -> Option<u32> {
    std::fs::metadata(dir).ok().map(|m| m.uid())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Whether `dir`, or the nearest ancestor that exists, is on a read-only
/// mount (the store may not exist yet).
fn read_only_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(existing) = dir.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statvfs is valid; statvfs writes into it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, s a valid out pointer.
    let ok = unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0;
    ok && s.f_flag & libc::ST_RDONLY != 0
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: zeroed passwd is valid; getpwuid_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed;
    // the strings pw points to live in buf, which outlives their use here.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string in buf.
    let name = unsafe { CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn denied(path: &str, errno: i32) -> anyhow::Error {
        anyhow::Error::new(modelfs_store::Error::Io {
            path: path.into(),
            cause: io::Error::from_raw_os_error(errno),
        })
        .context("opening store")
    }

    #[test]
    fn permission_errors_on_the_store_get_a_hint() {
        let e = denied("/srv/store/objects", libc::EACCES);
        let hint = store_access(&e, Path::new("/srv/store")).expect("a hint");
        assert!(hint.contains("/srv/store"), "{hint}");
        assert!(hint.contains("--store"), "{hint}");
        // Creating the store itself (or its parents) counts too.
        assert!(store_access(&denied("/srv", libc::EPERM), Path::new("/srv/store")).is_some());
    }

    #[test]
    fn other_errors_get_none() {
        // Not about permissions.
        let e = denied("/srv/store/objects", libc::ENOSPC);
        assert_eq!(store_access(&e, Path::new("/srv/store")), None);
        // Not on the store (a model being imported, say).
        let e = denied("/home/u/model/weights.bin", libc::EACCES);
        assert_eq!(store_access(&e, Path::new("/srv/store")), None);
        let e = anyhow::anyhow!("something else");
        assert_eq!(store_access(&e, Path::new("/srv/store")), None);
    }

    #[test]
    fn advice_says_whose_store_it_is_and_what_to_do() {
        let dir = Path::new("/var/lib/modelfs");
        let a = advice(dir, false, Some(0), 1000);
        assert!(a.contains("belongs to root"), "{a}");
        assert!(
            a.contains("run as its owner") && a.contains("--store"),
            "{a}"
        );
        let a = advice(dir, false, Some(1000), 1000);
        assert!(a.contains("is yours but not writable"), "{a}");
        let a = advice(dir, false, None, 1000);
        assert!(a.contains("cannot create a store"), "{a}");
        let a = advice(dir, true, Some(0), 1000);
        assert!(a.contains("read-only filesystem"), "{a}");
    }
}
