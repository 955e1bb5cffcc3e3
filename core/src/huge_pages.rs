//! Transparent huge pages off for the node and the proxy (see [`run_without`]), and for
//! anything measured against them (`proxy/examples/pingora_floor.rs`).

/// The node and the proxy run without transparent huge pages. mimalloc asks the kernel for
/// them on its heap (`MADV_HUGEPAGE`, honoured even where the system's THP mode is
/// `madvise`), so every 2 MiB region of a small heap that is touched at all becomes
/// resident: an idle node measured 20 MB of heap with them and 2 MB without (README,
/// "Cost per request"). lockd keeps huge pages: its heap holds the whole data set.
/// Called before a server starts, while the process has one thread (`src/main.rs`).
///
/// The kernel's flag applies to pages touched after it is set, and the allocator has
/// touched some before `main`; so with the flag newly set the program starts again in the
/// same process (`execv` keeps the PID, arguments, environment and descriptors), where the
/// flag is already set and nothing more happens. Where the flag or the re-exec is not
/// available (an old kernel, a binary replaced on disk), it runs on as it is.
pub fn run_without() {
    use nix::sys::prctl;
    use std::os::unix::ffi::OsStringExt;
    if prctl::get_thp_disable().unwrap_or(true) || prctl::set_thp_disable(true).is_err() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let Ok(path) = std::ffi::CString::new(exe.into_os_string().into_vec()) else {
        return;
    };
    let args: Result<Vec<std::ffi::CString>, _> = std::env::args_os()
        .map(|a| std::ffi::CString::new(a.into_vec()))
        .collect();
    if let Ok(args) = args {
        let _ = nix::unistd::execv(&path, &args);
    }
}
