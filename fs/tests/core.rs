//! The mount's core without a kernel mount: open decisions, verified
//! copy-mode reads, ENOENT vs EIO, catalog refresh, and the handle table's
//! passthrough bookkeeping and fallback, over a real temporary store.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use modelfs_fs::handles::{Handles, Opened};
use modelfs_fs::tree::{ROOT_INO, STATS_INO};
use modelfs_fs::vfs::OpenPlan;
use modelfs_fs::{Vfs, VfsConfig};
use modelfs_store::{ImportOptions, NoProgress, Store};

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn import(store: &mut Store, dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("w.bin"), bytes).unwrap();
    let opts = ImportOptions {
        name: name.into(),
        replace: false,
        follow_symlinks: false,
        allow_malformed: false,
        revision: None,
    };
    store.import(dir, &opts, &NoProgress).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: Store,
    base: Vec<u8>,
    variant: Vec<u8>,
}

/// `a/w.bin`: 3 MiB, all new (a whole-file object); `b/w.bin`: its first
/// 2 MiB and 1 MiB of its own (a recipe).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::init(&tmp.path().join("store")).unwrap();
    let base = noise(1, 3 << 20);
    let mut variant = base[..2 << 20].to_vec();
    variant.extend_from_slice(&noise(2, 1 << 20));
    import(&mut store, &tmp.path().join("a"), "a", &base);
    import(&mut store, &tmp.path().join("b"), "b", &variant);
    Fixture {
        _tmp: tmp,
        store,
        base,
        variant,
    }
}

fn vfs(f: &Fixture, passthrough: bool) -> Vfs {
    let config = VfsConfig {
        passthrough,
        pin_budget: 0,
        prefetch_window: 0,
    };
    Vfs::new(f.store.root(), &config).unwrap()
}

fn ino(vfs: &Vfs, model: &str) -> u64 {
    let dir = vfs.lookup(ROOT_INO, model).expect("model dir").ino;
    vfs.lookup(dir, "w.bin").expect("file").ino
}

/// Read a whole file through a copy-mode open, in requests of `step` bytes.
fn read_copy(vfs: &Vfs, ino: u64, len: usize, step: u32) -> Result<Vec<u8>, i32> {
    let OpenPlan::Copy(open) = vfs.open(ino)? else {
        panic!("expected a copy-mode open");
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let got = vfs.read(&open, out.len() as u64, step)?;
        assert!(!got.as_slice().is_empty(), "short read at {}", out.len());
        out.extend_from_slice(got.as_slice());
    }
    vfs.release(&open);
    Ok(out)
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "this test checks passthrough decisions, which need root (CAP_SYS_ADMIN); run it as root, as CI does"
    );
}

#[test]
fn open_decides_passthrough_for_whole_objects_and_copy_for_recipes() {
    require_root();
    let f = fixture();
    let v = vfs(&f, true);
    assert!(matches!(v.open(ino(&v, "a")), Ok(OpenPlan::Passthrough(_))));
    assert!(matches!(v.open(ino(&v, "b")), Ok(OpenPlan::Copy(_))));
    assert!(matches!(v.open(STATS_INO), Ok(OpenPlan::Generated(_))));
    assert_eq!(v.open(ROOT_INO).err(), Some(libc::EISDIR));
    assert_eq!(v.open(u64::MAX / 2).err(), Some(libc::ENOENT));
    let off = vfs(&f, false);
    assert!(matches!(off.open(ino(&off, "a")), Ok(OpenPlan::Copy(_))));
}

#[test]
fn copy_mode_reads_return_the_imported_bytes_for_any_request_size() {
    let f = fixture();
    let v = vfs(&f, false);
    for step in [4096, 131_072 + 17, 1 << 20] {
        assert!(read_copy(&v, ino(&v, "a"), f.base.len(), step).unwrap() == f.base);
        assert!(read_copy(&v, ino(&v, "b"), f.variant.len(), step).unwrap() == f.variant);
    }
    let OpenPlan::Copy(open) = v.open(ino(&v, "b")).unwrap() else {
        panic!()
    };
    assert!(v
        .read(&open, f.variant.len() as u64, 4096)
        .unwrap()
        .as_slice()
        .is_empty());
    let stats = v.mount_stats();
    assert_eq!(stats.eio, 0);
    assert!(stats.read_bytes >= 6 * f.variant.len() as u64);
}

/// Flip one byte of the variant's last chunk in its object.
fn damage_last_chunk(f: &Fixture) -> (u64, u64) {
    let (_, b) = f.store.resolve("b/w.bin").unwrap();
    let reader = f.store.open_file(b.content_id).unwrap();
    let last = reader.segments().len() - 1;
    let path = reader.object_of(last).path().to_path_buf();
    let at = reader.segments()[last].object_offset;
    let start = reader.segment_start(last);
    drop(reader);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    (start, f.variant.len() as u64 - start)
}

#[test]
fn a_damaged_chunk_is_eio_and_its_neighbours_still_read() {
    let f = fixture();
    let (start, len) = damage_last_chunk(&f);
    let v = vfs(&f, false);
    let OpenPlan::Copy(open) = v.open(ino(&v, "b")).unwrap() else {
        panic!()
    };
    assert_eq!(v.read(&open, start, 4096).err(), Some(libc::EIO));
    // Again: a bad chunk is never taken as checked.
    assert_eq!(v.read(&open, start + len - 1, 1).err(), Some(libc::EIO));
    let before = v.read(&open, 0, 1 << 20).unwrap();
    assert!(before.as_slice() == &f.variant[..1 << 20]);
    assert_eq!(v.mount_stats().eio, 2);
}

#[test]
fn removed_and_collected_is_enoent_a_lost_object_is_eio() {
    let mut f = fixture();
    let v = vfs(&f, false);
    let (a, b) = (ino(&v, "a"), ino(&v, "b"));
    // b's own object vanishes while the catalog still lists b: damage.
    let (_, info) = f.store.resolve("b/w.bin").unwrap();
    let reader = f.store.open_file(info.content_id).unwrap();
    let own = reader
        .object_of(reader.segments().len() - 1)
        .path()
        .to_path_buf();
    drop(reader);
    std::fs::remove_file(&own).unwrap();
    assert_eq!(v.open(b).err(), Some(libc::EIO));
    // a is removed and collected while the mount's tree still shows it.
    f.store.remove("a").unwrap();
    f.store.gc().unwrap();
    assert_eq!(v.open(a).err(), Some(libc::ENOENT));
}

#[test]
fn refresh_sees_imports_and_removals_once() {
    let mut f = fixture();
    let v = vfs(&f, false);
    assert!(v.refresh().unwrap().is_none(), "nothing changed yet");
    let tmp = tempfile::tempdir().unwrap();
    import(&mut f.store, tmp.path(), "c", &noise(3, 4096));
    let changes = v.refresh().unwrap().expect("an import is a change");
    assert!(
        changes.dirs.contains(&ROOT_INO),
        "the root's listing changed"
    );
    assert!(v.lookup(ROOT_INO, "c").is_some());
    assert!(v.refresh().unwrap().is_none(), "seen once");
    f.store.remove("c").unwrap();
    let changes = v.refresh().unwrap().expect("a removal is a change");
    assert!(
        changes.entries.contains(&(ROOT_INO, "c".to_string())),
        "the kernel must forget the removed name"
    );
    assert!(v.lookup(ROOT_INO, "c").is_none());
    let stats = v.mount_stats();
    assert_eq!((stats.imports_seen, stats.removals_seen), (1, 1));
    let names: Vec<String> = v
        .dir_entries(ROOT_INO, 0)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names[..2], [".", ".."]);
    assert!(names.contains(&"a".to_string()) && !names.contains(&"c".to_string()));
    // Listing from an offset continues where the kernel left off.
    let rest = v.dir_entries(ROOT_INO, 2).unwrap();
    assert_eq!(rest[0].name, names[2]);
}

#[test]
fn one_backing_per_inode_released_with_the_last_open() {
    require_root();
    let f = fixture();
    let v = vfs(&f, true);
    let handles: Handles<u32> = Handles::default();
    let registered = AtomicUsize::new(0);
    let register = |_: &std::fs::File| {
        registered.fetch_add(1, Ordering::Relaxed);
        Ok(7u32)
    };
    let a = ino(&v, "a");
    let (fh1, how1) = handles.open(&v, a, register).unwrap();
    let (fh2, how2) = handles.open(&v, a, register).unwrap();
    assert_eq!((how1, how2), (Opened::Passthrough, Opened::Passthrough));
    assert_eq!(
        registered.load(Ordering::Relaxed),
        1,
        "one registration per inode"
    );
    assert_eq!(handles.with_backing(a, |id| *id), Some(7));
    // Passthrough handles are read by the kernel, not by us.
    assert_eq!(handles.read(&v, fh1, 0, 10).err(), Some(libc::EBADF));
    handles.release(&v, fh1);
    assert_eq!(handles.backings(), 1);
    handles.release(&v, fh2);
    assert_eq!(handles.backings(), 0, "dropped with the last open");
    assert_eq!(v.mount_stats().passthrough_opens, 2);
}

#[test]
fn a_refused_backing_switches_the_mount_to_copy_mode() {
    require_root();
    let f = fixture();
    let v = vfs(&f, true);
    let handles: Handles<u32> = Handles::default();
    let a = ino(&v, "a");
    let refuse = |_: &std::fs::File| Err(std::io::Error::from_raw_os_error(libc::EPERM));
    let (fh, how) = handles.open(&v, a, refuse).unwrap();
    assert_eq!(how, Opened::Copy, "this open falls back to copy mode");
    assert!(!v.passthrough_enabled(), "and so does every later one");
    let got = handles.read(&v, fh, 0, 4096).unwrap();
    assert!(got.as_slice() == &f.base[..4096]);
    let never = |_: &std::fs::File| -> std::io::Result<u32> { panic!("not asked again") };
    assert_eq!(handles.open(&v, a, never).unwrap().1, Opened::Copy);
    handles.release(&v, fh);
}

#[test]
fn a_damaged_whole_object_is_served_in_copy_mode() {
    require_root();
    let f = fixture();
    let (_, a) = f.store.resolve("a/w.bin").unwrap();
    let object = a.whole_object.clone().expect("a whole-file object");
    let mut bytes = std::fs::read(&object).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let v = vfs(&f, true);
    let OpenPlan::Copy(open) = v.open(ino(&v, "a")).unwrap() else {
        panic!("a damaged whole object must not be passed through");
    };
    assert!(v.read(&open, 0, 4096).unwrap().as_slice() == &f.base[..4096]);
    assert_eq!(v.read(&open, last as u64, 1).err(), Some(libc::EIO));
}
