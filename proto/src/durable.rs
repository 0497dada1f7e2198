//! The steps of a write that decide what survives a crash (a file's fsync, a rename, a folder's
//! fsync), each between two failpoints: `{what}-{op}-before` and `{what}-{op}-after`, where
//! `what` names the file (`raft-log`, `raft-state`, `raft-snapshot`, `checkpoint`) and `op` the
//! step (`fsync`, `rename`, `dirsync`).
//!
//! In a build with the `failpoints` feature (the chaos tests' build: docs/chaos.md), the file
//! named by `TANDEM_FAILPOINTS` sets the points, one `name=actions` per line in the `fail`
//! crate's syntax, and is read again whenever it changes. `return(crash)` ends the process at
//! the point as a kill -9 would (nothing after it runs), `return(eio)` fails the step as a
//! failing disk would; `sleep(ms)`, `pause` and the rest work as in `fail`. Without the
//! feature the points compile to nothing and setting `TANDEM_FAILPOINTS` is an error.

use std::io;
use std::path::Path;

/// The process's exit status when a failpoint crashed it.
pub const CRASH_EXIT: i32 = 86;

/// Runs `step` (operation `op` of a write to `what`) between its two failpoints.
pub fn step<T>(what: &str, op: &str, step: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    point(what, op, "before")?;
    let out = step()?;
    point(what, op, "after")?;
    Ok(out)
}

#[cfg(feature = "failpoints")]
fn point(what: &str, op: &str, when: &str) -> io::Result<()> {
    let name = format!("{what}-{op}-{when}");
    fail::fail_point!(&name, |arg: Option<String>| match arg.as_deref() {
        Some("crash") => {
            eprintln!("failpoint {name}: crashing");
            // No destructor, flush or atexit handler runs: as close to kill -9 as a process can
            // do to itself.
            std::process::exit(CRASH_EXIT)
        }
        _ => Err(io::Error::other(format!("input/output error (failpoint {name})"))),
    });
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn point(_what: &str, _op: &str, _when: &str) -> io::Result<()> {
    Ok(())
}

/// Sets the failpoints from `TANDEM_FAILPOINTS` if it names a file (an absent file sets none),
/// and follows the file's changes from a thread of its own.
pub fn failpoints_from_env() -> Result<(), String> {
    let Some(path) = std::env::var_os("TANDEM_FAILPOINTS") else { return Ok(()) };
    watch(Path::new(&path))
}

#[cfg(not(feature = "failpoints"))]
fn watch(path: &Path) -> Result<(), String> {
    Err(format!(
        "TANDEM_FAILPOINTS is set ({}) but this tandem was built without the `failpoints` feature",
        path.display()
    ))
}

#[cfg(feature = "failpoints")]
fn watch(path: &Path) -> Result<(), String> {
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let mut text = read(path);
    set(&text)?;
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = read(&path);
            if now != text {
                if let Err(e) = set(&now) {
                    eprintln!("failpoints: {}: {e}", path.display());
                }
                text = now;
            }
        }
    });
    Ok(())
}

/// Makes `text` (`name=actions` lines) the whole set of failpoints.
#[cfg(feature = "failpoints")]
fn set(text: &str) -> Result<(), String> {
    for (name, _) in fail::list() {
        fail::remove(name);
    }
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, actions) = line.split_once('=').ok_or_else(|| format!("{line:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| format!("{line:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn a_point_set_to_eio_fails_its_step_and_the_steps_around_it_run() {
        set("t-write-fsync-after=return(eio)").unwrap();
        let mut ran = 0;
        let err = step("t-write", "fsync", || {
            ran += 1;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("failpoint t-write-fsync-after"), "{err}");
        assert_eq!(ran, 1, "the step itself ran: the point is after it");
        set("").unwrap();
        assert!(step("t-write", "fsync", || Ok(())).is_ok());
        assert!(set("no equals sign").is_err());
    }
}
