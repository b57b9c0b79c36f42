//! `modelfs install`: put the binary, the sharing library, the mount helper,
//! the systemd units and an example configuration in place. `--root`
//! installs into a staging directory (packaging, tests).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use modelfs_mount_helper::{EXAMPLE_CONFIG, MOUNT_UNIT, SERVICE_UNIT as SERVICE};
const OPERATIONS: &str = include_str!("../../docs/operations.md");

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Installation prefix of the binary
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Install below this directory instead of / (staging)
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Do not install the systemd units
    #[arg(long)]
    no_systemd: bool,
}

fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let tmp = path.with_extension("modelfs-new");
    std::fs::write(&tmp, contents).with_context(|| format!("{}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    println!("installed {}", path.display());
    Ok(())
}

pub fn run(args: &InstallArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin = args.prefix.join("bin/modelfs");
    let bytes = std::fs::read(&exe).with_context(|| format!("{}", exe.display()))?;
    write(&under(&args.root, &bin), &bytes, 0o755)?;

    // The sharing library, where `modelfs exec` looks for it. Optional: a
    // binary copied around without it still installs (exec then says so).
    match crate::commands::exec::find_preload() {
        Ok(lib) => {
            let bytes = std::fs::read(&lib).with_context(|| format!("{}", lib.display()))?;
            let dest = args
                .prefix
                .join(crate::commands::exec::PRELOAD_LIB_DIR)
                .join(crate::commands::exec::PRELOAD_NAME);
            write(&under(&args.root, &dest), &bytes, 0o755)?;
        }
        Err(e) => eprintln!("modelfs: warning: not installing the sharing library: {e:#}"),
    }

    // mount(8) looks for /sbin/mount.<type>; fuse.modelfs -> mount.fuse.modelfs.
    let helper = under(&args.root, Path::new("/sbin/mount.fuse.modelfs"));
    std::fs::create_dir_all(helper.parent().expect("has parent"))?;
    let _ = std::fs::remove_file(&helper);
    std::os::unix::fs::symlink(&bin, &helper).with_context(|| format!("{}", helper.display()))?;
    println!("installed {} -> {}", helper.display(), bin.display());

    let config = under(&args.root, Path::new("/etc/modelfs/config.toml"));
    if config.exists() {
        println!("kept existing {}", config.display());
    } else {
        write(&config, EXAMPLE_CONFIG.as_bytes(), 0o644)?;
    }
    if !args.no_systemd {
        let docs = args.prefix.join("share/doc/modelfs");
        write(
            &under(&args.root, &docs.join("operations.md")),
            OPERATIONS.as_bytes(),
            0o644,
        )?;
        let unit = SERVICE
            .replace("/usr/local/bin/modelfs", &bin.to_string_lossy())
            .replace("/usr/local/share/doc/modelfs", &docs.to_string_lossy());
        write(
            &under(&args.root, Path::new("/etc/systemd/system/modelfs.service")),
            unit.as_bytes(),
            0o644,
        )?;
        let doc = under(
            &args.root,
            &args.prefix.join("share/doc/modelfs/models.mount"),
        );
        write(&doc, MOUNT_UNIT.as_bytes(), 0o644)?;
        println!("enable with: systemctl daemon-reload && systemctl enable --now modelfs");
    }
    Ok(())
}
