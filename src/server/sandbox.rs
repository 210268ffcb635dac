//! Confinement of a job's child process, where the uploaded TorchScript runs.
//!
//! TorchScript is code, and the child runs as the server's user: unconfined, a model
//! that found a way to open files could read every other client's uploads and reports in
//! the data directory, the settings file, or the server's environment (its database
//! password and API token), and could reach the network. On Linux the child confines
//! itself before it opens the model:
//! - Landlock: it may write only in its job's folder (inputs, outputs, scratch files:
//!   the worker points `TMPDIR` there), and there make only plain files and folders (no
//!   link, FIFO, socket or device, which the server would meet when it reads the job's
//!   outputs); it may execute no file at all;
//! - on a CPU slot it may read only its job's folder, the system's library folders
//!   (`/usr`, `/lib*`), the libraries it already maps and their folders (libtorch's),
//!   its own `/proc/self` and a few machine-wide `/proc` files, `/sys`, and a few device
//!   files; a CUDA slot keeps read access everywhere and may also drive `/dev/nvidia*`,
//!   since what the driver reads cannot be listed without a GPU to test on;
//! - it may neither bind nor connect TCP sockets, signal a process outside its sandbox
//!   (the server), connect to abstract UNIX sockets made outside it, nor open another
//!   process's memory;
//! - seccomp: `socket` and `io_uring_setup` fail (no UNIX socket by path, UDP or TCP
//!   `listen`, which Landlock does not govern on these kernels), and so does starting a
//!   process (threads are fine) or a new session or process group.
//!
//! Landlock lets a confined process read another process's `/proc/<pid>/environ` and
//! `maps` (ptrace's "read" mode), so two more steps keep the server's environment from a
//! child that can read `/proc` (a CUDA slot's): the server makes itself non-dumpable
//! ([`protect_server_process`]), which closes those files to any process without
//! `CAP_SYS_PTRACE`, and the child drops every capability it has (a server run as root
//! would otherwise hand them on).
//!
//! Landlock needs no privileges. On a kernel without it (before 5.13, or not enabled,
//! or refused by a container's seccomp profile) the child runs unconfined but for the
//! seccomp filter, and [`kernel_support`] lets the server say so at start; older
//! kernels enforce the part they know (files from 5.13, truncation from 6.2, TCP from
//! 6.7, signals and abstract sockets from 6.12).

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
    /// The kernel has no Landlock: only the seccomp filter holds.
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
        // address perms offset dev inode path: no field before the path has a `/`, and
        // the path runs to the end of the line (it may hold spaces).
        .filter_map(|line| line.find('/').map(|at| &line[at..]))
        .map(|path| PathBuf::from(path.trim_end_matches(" (deleted)")))
        .filter(|path| path.is_absolute() && path.is_file())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// `libfoo.so`, `libfoo.so.1.2`: a shared library by its name.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn is_shared_library(file: &Path) -> bool {
    file.file_name()
        .map(|name| name.to_string_lossy())
        .is_some_and(|name| name.ends_with(".so") || name.contains(".so."))
}

/// The folders of the shared libraries among `mapped` files, which a confined child may
/// read, since libtorch may load more of its own libraries later and they sit beside the
/// ones it loaded first. Not the executable's folder (a settings file or `.env` may sit
/// beside the binary), and not a folder that holds the job's own folder (libraries
/// installed beside the data, as in `/srv/bdscan/lib` with `/srv/bdscan`'s data), which
/// would open the data directory and every other job's folder: those files are allowed
/// one by one instead.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn library_folders(mapped: &[PathBuf], work_dir: &Path) -> Vec<PathBuf> {
    let mut folders: Vec<PathBuf> = mapped
        .iter()
        .filter(|file| is_shared_library(file))
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
        // In its folder the job makes, writes, truncates, renames (in place) and removes
        // plain files and folders, and nothing else: no symbolic link, FIFO, socket or
        // device node, which the server would meet when it reads the job's outputs, and
        // no hard link or move from elsewhere (`Refer` is handled and never granted).
        // Execution is handled and never granted anywhere, so no file can be executed;
        // the dynamic loader maps libraries by reading them, which needs only `read`.
        let job_folder = read_write
            | AccessFs::Truncate
            | AccessFs::MakeReg
            | AccessFs::MakeDir
            | AccessFs::RemoveFile
            | AccessFs::RemoveDir;
        let work_dir =
            PathFd::new(&confinement.work_dir).map_err(|e| fail("opening the job folder", &e))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(work_dir, job_folder))
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
        for device in DEVICES {
            ruleset = allow(ruleset, Path::new(device), read_write)?;
        }
        if !confinement.restrict_reads {
            // CUDA opens its devices read-write and drives them with ioctl; the rest of
            // /dev (/dev/shm, other devices) stays closed to writes.
            for device in nvidia_devices() {
                ruleset = allow(ruleset, &device, read_write | AccessFs::IoctlDev)?;
            }
        }
        let status = ruleset
            .restrict_self()
            .map_err(|e| fail("restricting the process", &e))?;
        refuse_sockets_and_processes().map_err(|e| fail("installing the seccomp filter", &e))?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Confined::Fully,
            RulesetStatus::PartiallyEnforced => Confined::Partly,
            RulesetStatus::NotEnforced => Confined::Not,
        })
    }

    /// `/dev/nvidia*` (`nvidia0`, `nvidiactl`, `nvidia-uvm`, …) as they exist now.
    fn nvidia_devices() -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/dev")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Installs [`super::seccomp::program`] on this thread (and what it starts from now on).
    pub(super) fn refuse_sockets_and_processes() -> std::io::Result<()> {
        let Some(mut program) = super::seccomp::program() else {
            return Ok(());
        };
        let filter = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        // SAFETY: prctl reads the flag, and the program through `filter`, which outlives
        // the call; the kernel copies the program.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &filter as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
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

/// The seccomp filter of a confined child: what Landlock cannot refuse on the kernels
/// it runs on.
#[cfg(target_os = "linux")]
mod seccomp {
    // Classic BPF opcodes (linux/bpf_common.h) and `struct seccomp_data` offsets.
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JUMP_IF_AT_LEAST: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JUMP_IF_ANY_BIT: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const SYSCALL_NUMBER: u32 = 0;
    const ARCHITECTURE: u32 = 4;
    /// The low 32 bits of the first argument, on a little-endian machine.
    const FIRST_ARGUMENT: u32 = 16;
    /// x32 system calls carry this bit on x86_64; no aarch64 number reaches it.
    const X32_BIT: u32 = 0x4000_0000;
    const CLONE_THREAD: u32 = 0x0001_0000;

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Label {
        Next,
        CloneFlags,
        Allow,
        NoSys,
        Refuse,
    }

    /// The program, or `None` on an architecture it does not know. It fails with EACCES:
    /// - `socket` and `io_uring_setup` (whose requests can make sockets without the
    ///   `socket` call): a scan needs no socket, and Landlock governs only TCP `bind` and
    ///   `connect` on these kernels (not UNIX sockets by path, UDP or TCP `listen`);
    /// - new processes (`fork`, `vfork`, `clone` without `CLONE_THREAD`), so that nothing
    ///   the job starts outlives it (a scan only ever starts threads), and `setsid` and
    ///   `setpgid`;
    /// - any system call of another architecture's numbering (x32, or i386 through
    ///   `int 0x80`), since the numbers checked are this architecture's.
    ///
    /// `clone3` fails with ENOSYS instead: its flags are in memory a filter cannot read,
    /// and on ENOSYS glibc starts threads with `clone`, whose flags it can.
    pub fn program() -> Option<Vec<libc::sock_filter>> {
        #[cfg(target_arch = "x86_64")]
        let (audit_arch, refused): (u32, &[libc::c_long]) = (
            0xC000_003E,
            &[
                libc::SYS_socket,
                libc::SYS_io_uring_setup,
                libc::SYS_setsid,
                libc::SYS_setpgid,
                libc::SYS_fork,
                libc::SYS_vfork,
            ],
        );
        #[cfg(target_arch = "aarch64")]
        let (audit_arch, refused): (u32, &[libc::c_long]) = (
            0xC000_00B7,
            &[
                libc::SYS_socket,
                libc::SYS_io_uring_setup,
                libc::SYS_setsid,
                libc::SYS_setpgid,
            ],
        );
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let (audit_arch, refused): (u32, &[libc::c_long]) = {
            return None;
        };
        use Label::*;
        let mut steps: Vec<(Option<Label>, u16, Label, Label, u32)> = vec![
            (None, LOAD_WORD, Next, Next, ARCHITECTURE),
            (None, JUMP_IF_EQUAL, Next, Refuse, audit_arch),
            (None, LOAD_WORD, Next, Next, SYSCALL_NUMBER),
            (None, JUMP_IF_AT_LEAST, Refuse, Next, X32_BIT),
        ];
        for &number in refused {
            steps.push((None, JUMP_IF_EQUAL, Refuse, Next, number as u32));
        }
        steps.extend([
            (None, JUMP_IF_EQUAL, NoSys, Next, libc::SYS_clone3 as u32),
            (
                None,
                JUMP_IF_EQUAL,
                CloneFlags,
                Allow,
                libc::SYS_clone as u32,
            ),
            (Some(CloneFlags), LOAD_WORD, Next, Next, FIRST_ARGUMENT),
            (None, JUMP_IF_ANY_BIT, Allow, Refuse, CLONE_THREAD),
            (Some(Allow), RETURN, Next, Next, libc::SECCOMP_RET_ALLOW),
            (
                Some(NoSys),
                RETURN,
                Next,
                Next,
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            ),
            (
                Some(Refuse),
                RETURN,
                Next,
                Next,
                libc::SECCOMP_RET_ERRNO | libc::EACCES as u32,
            ),
        ]);
        // Jumps are relative and forward only: resolve each label to its step.
        let at = |label: Label| steps.iter().position(|step| step.0 == Some(label));
        let offset = |from: usize, label: Label| -> u8 {
            match label {
                Next => 0,
                _ => {
                    let to = at(label).expect("every label is placed");
                    u8::try_from(to - from - 1).expect("a forward jump within 255 steps")
                }
            }
        };
        Some(
            steps
                .iter()
                .enumerate()
                .map(|(i, &(_, code, jt, jf, k))| libc::sock_filter {
                    code,
                    jt: offset(i, jt),
                    jf: offset(i, jf),
                    k,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_folders_never_hold_the_job_folder() {
        let mapped: Vec<PathBuf> = [
            "/srv/bdscan/lib/libtorch_cpu.so",
            "/opt/bdscan/bin/bdscan",
            "/opt/torch/lib/libtorch_cpu.so",
            "/opt/torch/lib/libc10.so",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/libtiny.so",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let folders = library_folders(&mapped, Path::new("/srv/bdscan/lib/data/work/job-1"));
        assert_eq!(
            folders,
            [
                PathBuf::from("/opt/torch/lib"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu")
            ],
            "not /srv/bdscan/lib (it holds the data), not the executable's folder, not /"
        );
    }

    /// On a thread of its own, which keeps the filter until it ends.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_seccomp_filter_refuses_sockets_and_processes_but_not_threads() {
        let errno = || std::io::Error::last_os_error().raw_os_error();
        std::thread::spawn(move || {
            // SAFETY (all blocks below): plain system calls on integers or null.
            assert!(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } >= 0);
            linux::refuse_sockets_and_processes().unwrap();
            assert_eq!(
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) },
                -1
            );
            assert_eq!(errno(), Some(libc::EACCES));
            assert_eq!(
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) },
                -1
            );
            assert_eq!(unsafe { libc::setsid() }, -1);
            assert_eq!(errno(), Some(libc::EACCES));
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe { libc::_exit(0) };
            }
            assert_eq!(pid, -1, "fork refused");
            assert_eq!(errno(), Some(libc::EACCES));
            let clone3 = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            assert_eq!(clone3, -1);
            assert_eq!(errno(), Some(libc::ENOSYS));
            // glibc falls back from clone3 to clone for threads, which pass.
            assert_eq!(std::thread::spawn(|| 6 * 7).join().unwrap(), 42);
            assert!(unsafe { libc::getpid() } > 0);
        })
        .join()
        .unwrap();
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
