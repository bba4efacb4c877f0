//! QEMU-compatible image locking, so strata and QEMU (qemu-img, qemu-io, a VM, a storage
//! daemon) refuse to use one image in conflicting ways at once.
//!
//! The scheme is QEMU's: open-file-description read locks (`F_OFD_SETLK`, `F_RDLCK`) on single
//! bytes. For each permission `i` (0 consistent read, 1 write, 2 write unchanged, 3 resize) an
//! opener locks byte `100 + i` if it *holds* the permission and byte `200 + i` if it does *not
//! share* it. A conflict is probed with `F_OFD_GETLK` for a write lock: someone else holds byte
//! `200 + i` for a permission we want, or byte `100 + i` for one we will not share. All locks
//! are read locks, so taking them never fails; only the probe finds conflicts.
//!
//! Changing the locks (a reopen) takes the union of old and new first, probes, and only then
//! drops what is no longer needed, so there is no window in which another process could slip
//! in. On a conflict the bytes just taken are released and the old state stays.

use std::io;
use std::os::fd::RawFd;

use graph::{Error, ErrorKind, Perm};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What an open file holds: the permissions it uses and those it does not share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockState {
    /// Permissions used (bytes 100 + i).
    pub perm: Perm,
    /// Permissions not shared (bytes 200 + i).
    pub unshared: Perm,
}

fn flock(fd: RawFd, cmd: i32, ty: i16, byte: i64) -> io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fcntl with an OFD lock command reads and writes the flock we pass.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

fn lock_byte(fd: RawFd, byte: i64) -> io::Result<()> {
    flock(fd, libc::F_OFD_SETLK, libc::F_RDLCK as i16, byte).map(drop)
}

fn unlock_byte(fd: RawFd, byte: i64) -> io::Result<()> {
    flock(fd, libc::F_OFD_SETLK, libc::F_UNLCK as i16, byte).map(drop)
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(fd: RawFd, byte: i64) -> io::Result<bool> {
    let fl = flock(fd, libc::F_OFD_GETLK, libc::F_WRLCK as i16, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn bytes(state: LockState) -> Vec<i64> {
    Perm::EACH
        .iter()
        .flat_map(|&(i, p, _)| {
            let i = i as i64;
            let a = state.perm.contains(p).then_some(PERM_BASE + i);
            let b = state.unshared.contains(p).then_some(SHARED_BASE + i);
            a.into_iter().chain(b)
        })
        .collect()
}

fn conflict(path: &str, what: String) -> Error {
    Error::new(
        ErrorKind::PermissionConflict,
        format!("{what}. Is another process using the image [{path}]?"),
    )
}

/// Moves `fd`'s locks from `cur` to `new`, without a window. On error `cur` still holds.
pub fn apply(fd: RawFd, path: &str, cur: &mut LockState, new: LockState) -> Result<(), Error> {
    let have = bytes(*cur);
    let mut taken = Vec::new();
    let undo = |taken: &[i64]| {
        for &b in taken {
            let _ = unlock_byte(fd, b);
        }
    };
    for b in bytes(new) {
        if have.contains(&b) {
            continue;
        }
        if let Err(e) = lock_byte(fd, b) {
            undo(&taken);
            return Err(Error::io(format!("Failed to lock byte {b} of '{path}'"), e));
        }
        taken.push(b);
    }
    for &(i, p, name) in &Perm::EACH {
        let i = i as i64;
        let probe = if new.perm.contains(p) {
            Some((SHARED_BASE + i, format!("Failed to get \"{name}\" lock")))
        } else {
            None
        }
        .into_iter()
        .chain(new.unshared.contains(p).then(|| {
            (
                PERM_BASE + i,
                format!("Failed to get shared \"{name}\" lock"),
            )
        }));
        for (byte, what) in probe {
            match byte_taken(fd, byte) {
                Ok(false) => {}
                Ok(true) => {
                    undo(&taken);
                    return Err(conflict(path, what));
                }
                Err(e) => {
                    undo(&taken);
                    return Err(Error::io(format!("{what} on '{path}'"), e));
                }
            }
        }
    }
    let keep = bytes(new);
    for b in have {
        if !keep.contains(&b) {
            // Dropping a read lock cannot conflict; an error here leaves a stale lock that
            // only makes others more careful, so it is not fatal.
            let _ = unlock_byte(fd, b);
        }
    }
    *cur = new;
    Ok(())
}

/// What QEMU takes for a read-write image opener (a format node writing its file): it uses
/// consistent read, write and resize, and shares neither write nor resize.
pub fn read_write_state() -> LockState {
    LockState {
        perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        unshared: Perm::WRITE | Perm::RESIZE,
    }
}

/// The lock state for a node's users taking `perm` and sharing `shared`.
pub fn state_for(perm: Perm, shared: Perm) -> LockState {
    LockState {
        perm,
        unshared: !shared,
    }
}

/// Moves the locks of `state` from `from` to `to` (two descriptors of one file, as a reopen
/// has), ending in `new` on `to`, without a window: `to` takes the union first, `from` lets go,
/// and only then `to` probes for conflicts with other processes (probing earlier would find
/// `from`'s own locks). On a conflict `from` takes `state` back and `to` releases everything.
pub fn transfer(
    from: RawFd,
    to: RawFd,
    path: &str,
    state: &mut LockState,
    new: LockState,
) -> Result<(), Error> {
    let union = LockState {
        perm: state.perm | new.perm,
        unshared: state.unshared | new.unshared,
    };
    let mut on_to = LockState::default();
    for b in bytes(union) {
        if let Err(e) = lock_byte(to, b) {
            release_all(to, on_to);
            return Err(Error::io(format!("Failed to lock byte {b} of '{path}'"), e));
        }
        on_to = union;
    }
    release_all(from, *state);
    let mut probe_state = on_to;
    match apply(to, path, &mut probe_state, new) {
        Ok(()) => {
            *state = new;
            Ok(())
        }
        Err(e) => {
            for b in bytes(*state) {
                let _ = lock_byte(from, b);
            }
            release_all(to, union);
            Err(e)
        }
    }
}

/// Moves `state` from `from` back to `to` with no probe (our own locks returning to the
/// descriptor that held them: nobody else could take conflicting ones meanwhile).
pub fn move_back(from: RawFd, to: RawFd, state: LockState) {
    for b in bytes(state) {
        let _ = lock_byte(to, b);
    }
    release_all(from, state);
}

/// Releases every lock byte of `state` held through `fd`.
pub fn release_all(fd: RawFd, state: LockState) {
    for b in bytes(state) {
        let _ = unlock_byte(fd, b);
    }
}
