//! Confinement of a job's child process, where the uploaded TorchScript runs.
//!
//! TorchScript is code, and the child runs as the server's user: unconfined, a model
//! that found a way to open files could read every other client's uploads and reports in
//! the data directory, the settings file, or the server's environment (its database
//! password and API token), and could reach the network. On Linux the child confines
//! itself with Landlock before it opens the model:
//! - it may write only in its job's folder (inputs, outputs, scratch files: the worker
//!   points `TMPDIR` there), and execute no file at all;
//! - on a CPU slot it may read only its job's folder, the system's library folders
//!   (`/usr`, `/lib*`), the folders of the libraries it already maps (libtorch), its own
//!   `/proc/self` and a few machine-wide `/proc` files, `/sys`, and a few device files; a
//!   CUDA slot keeps read access everywhere, since the driver's files cannot be listed
//!   without a GPU to test on;
//! - it may neither bind nor connect TCP sockets, signal a process outside its sandbox
//!   (the server), connect to abstract UNIX sockets made outside it, nor open another
//!   process's memory.
//!
//! Landlock lets a confined process read another process's `/proc/<pid>/environ` and
//! `maps` (ptrace's "read" mode), so two more steps keep the server's environment from a
//! child that can read `/proc` (a CUDA slot's): the server makes itself non-dumpable
//! ([`protect_server_process`]), which closes those files to any process without
//! `CAP_SYS_PTRACE`, and the child drops every capability it has (a server run as root
//! would otherwise hand them on).
//!
//! Landlock needs no privileges. On a kernel without it (before 5.13, or not enabled)
//! the child runs unconfined, and [`kernel_support`] lets the server say so at start;
//! older kernels enforce the part they know (file rules from 5.13, TCP from 6.7,
//! signals and abstract sockets from 6.12).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the worker asks of a job's child: where it may write, and whether reads are
/// confined too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The job's folder, the only place the child may write.
    pub work_dir: PathBuf,
    /// Confine reads to the job's folder and the system's and libtorch's files (CPU
    /// slots); false leaves reads open (CUDA slots).
    pub restrict_reads: bool,
}

/// How far the confinement took hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confined {
    /// Every restriction asked for is enforced.
    Fully,
    /// The kernel enforces only some of them (an older Landlock).
    Partly,
    /// The kernel has no Landlock: nothing is enforced.
    Not,
}

/// The Landlock ABI version the kernel offers, or why there is none; for the start log.
pub fn kernel_support() -> Result<i64, String> {
    #[cfg(target_os = "linux")]
    {
        // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) answers the
        // version without creating anything.
        // SAFETY: with a null attribute pointer and size 0 the kernel reads no memory.
        let version = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                1u32,
            )
        };
        if version >= 1 {
            Ok(version)
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    }
    #[cfg(not(target_os = "linux"))]
    Err("Landlock exists only on Linux".into())
}

/// Closes the server's `/proc/<pid>` files that need ptrace's "read" right (`environ`,
/// `maps`, `fd`) to processes of its user without `CAP_SYS_PTRACE`, as the job children
/// are once they drop their capabilities. It also turns off the server's core dumps,
/// which would hold the same secrets.
pub fn protect_server_process() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes an integer and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}

/// Confines this process (and the threads and processes it starts from now on) as
/// `confinement` says. Call it before any other thread starts: Landlock restricts the
/// calling thread and what it spawns after.
pub fn confine(confinement: &Confinement) -> Result<Confined, String> {
    #[cfg(target_os = "linux")]
    {
        linux::confine(confinement)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = confinement;
        Ok(Confined::Not)
    }
}

/// The files this process maps (its executable and shared libraries), from
/// `/proc/self/maps`: only names that are files on disk (not `memfd:` or SysV shared
/// memory, whose names would make their "folder" `/`).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn mapped_files() -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = maps
        .lines()
        // address perms offset dev inode path: the path is the sixth field.
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|path| path.is_absolute() && path.is_file())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// The folders of `mapped` files a confined child may read, since libtorch may load more
/// of its own libraries later and they sit beside the ones it loaded first; but not a
/// folder that holds the job's own folder (a server installed as `/srv/bdscan/bdscan`
/// with its data in `/srv/bdscan/data`), which would open the data directory and every
/// other job's folder. Those files are allowed one by one instead.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn library_folders(mapped: &[PathBuf], work_dir: &Path) -> Vec<PathBuf> {
    let mut folders: Vec<PathBuf> = mapped
        .iter()
        .filter_map(|file| file.parent())
        .filter(|folder| folder.parent().is_some() && !work_dir.starts_with(folder))
        .map(Path::to_path_buf)
        .collect();
    folders.sort();
    folders.dedup();
    folders
}

#[cfg(target_os = "linux")]
mod linux {
    use std::path::Path;

    use landlock::{
        Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };

    use super::{library_folders, mapped_files, Confined, Confinement};

    /// The newest Landlock ABI whose rights this policy names; the crate degrades it to
    /// what the running kernel knows.
    const POLICY_ABI: ABI = ABI::V6;

    /// System files a CPU job may read: the dynamic loader's libraries and its cache,
    /// what libtorch and its OpenMP read about the machine, and the process's own
    /// `/proc/self` (which names this process's folder when the rule is made), but no
    /// other process's.
    const SYSTEM_READ: [&str; 11] = [
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/etc/ld.so.cache",
        "/proc/self",
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/proc/stat",
        "/proc/sys",
        "/sys",
    ];

    /// Device files a CPU job may read and write.
    const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

    /// `capset` with every set empty: a child of a server run as root keeps uid 0 but
    /// loses what lets root pass permission checks (reading a non-dumpable process's
    /// `/proc` files, other users' files).
    fn drop_capabilities() -> std::io::Result<()> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Sets {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // _LINUX_CAPABILITY_VERSION_3: two 32-bit words of each set.
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let sets = [Sets::default(); 2];
        // SAFETY: the kernel reads the header and two `Sets`, which live until it returns.
        let done = unsafe { libc::syscall(libc::SYS_capset, &header, sets.as_ptr()) };
        if done == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    pub fn confine(confinement: &Confinement) -> Result<Confined, String> {
        drop_capabilities().map_err(|e| format!("dropping capabilities: {e}"))?;
        let every = AccessFs::from_all(POLICY_ABI);
        let read: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
        let read_write = read | AccessFs::WriteFile;
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        let mut ruleset = Ruleset::default()
            .handle_access(every)
            .map_err(|e| fail("handling file access", &e))?
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(|e| fail("handling network access", &e))?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(|e| fail("scoping signals and sockets", &e))?
            .create()
            .map_err(|e| fail("creating the ruleset", &e))?;
        // Execution is handled and never granted, so no file can be executed; the
        // dynamic loader maps libraries by reading them, which needs only `read`.
        let work_dir =
            PathFd::new(&confinement.work_dir).map_err(|e| fail("opening the job folder", &e))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(work_dir, every & !AccessFs::Execute))
            .map_err(|e| fail("allowing the job folder", &e))?;
        let mut readable: Vec<std::path::PathBuf> = Vec::new();
        if confinement.restrict_reads {
            readable.extend(SYSTEM_READ.iter().map(std::path::PathBuf::from));
            // Relative to the server's folder as given; compared with libraries' absolute
            // folders once made absolute.
            let work_dir = std::fs::canonicalize(&confinement.work_dir)
                .map_err(|e| fail("resolving the job folder", &e))?;
            let mapped = mapped_files();
            readable.extend(library_folders(&mapped, &work_dir));
            readable.extend(mapped);
        } else {
            readable.push("/".into());
        }
        for path in readable {
            ruleset = allow(ruleset, &path, read)?;
        }
        if confinement.restrict_reads {
            for device in DEVICES {
                ruleset = allow(ruleset, Path::new(device), read_write)?;
            }
        } else {
            // CUDA opens /dev/nvidia* read-write and drives them with ioctl.
            ruleset = allow(ruleset, Path::new("/dev"), read_write | AccessFs::IoctlDev)?;
        }
        let status = ruleset
            .restrict_self()
            .map_err(|e| fail("restricting the process", &e))?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Confined::Fully,
            RulesetStatus::PartiallyEnforced => Confined::Partly,
            RulesetStatus::NotEnforced => Confined::Not,
        })
    }

    /// Adds a rule for `path` with the rights a file or a folder can carry; a path this
    /// machine lacks (no `/lib32`) is skipped.
    fn allow(
        ruleset: landlock::RulesetCreated,
        path: &Path,
        access: BitFlags<AccessFs>,
    ) -> Result<landlock::RulesetCreated, String> {
        let Ok(metadata) = std::fs::metadata(path) else {
            return Ok(ruleset);
        };
        let access = if metadata.is_dir() {
            access
        } else {
            // Folder-only rights (listing) on a file would be refused.
            access & AccessFs::from_file(POLICY_ABI)
        };
        let fd = match PathFd::new(path) {
            Ok(fd) => fd,
            Err(_) => return Ok(ruleset),
        };
        ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| format!("allowing {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_folders_never_hold_the_job_folder() {
        let mapped: Vec<PathBuf> = [
            "/srv/bdscan/bdscan",
            "/opt/torch/lib/libtorch_cpu.so",
            "/opt/torch/lib/libc10.so",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/libtiny.so",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let folders = library_folders(&mapped, Path::new("/srv/bdscan/data/work/job-1"));
        assert_eq!(
            folders,
            [
                PathBuf::from("/opt/torch/lib"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu")
            ],
            "not /srv/bdscan (it holds the data), not /"
        );
    }

    #[test]
    fn mapped_files_are_files_on_disk() {
        let files = mapped_files();
        assert!(!files.is_empty());
        assert!(
            files.iter().all(|f| f.is_absolute() && f.is_file()),
            "{files:?}"
        );
        // This test binary is one of them.
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        assert!(files.contains(&exe), "{exe:?} not in {files:?}");
    }
}
