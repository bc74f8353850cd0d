//! Live key material: unwrapped data keys in locked, zeroized memory. These types are never
//! Serialize and their Debug prints no bytes.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use zeroize::Zeroize;

pub const DATA_KEY_LEN: usize = 32;

static LOCK_WARNED: AtomicBool = AtomicBool::new(false);

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map(|p| p as usize)
            .filter(|p| p.is_power_of_two() && *p >= DATA_KEY_LEN)
            .unwrap_or(4096)
    })
}

/// A 32-byte data key in a page of its own, locked in RAM where the OS allows (a page of its
/// own so that unlocking it on drop cannot unlock another allocation), zeroized on drop.
pub struct DataKey {
    page: NonNull<u8>,
    locked: bool,
}

// The page is owned exclusively and only read after construction.
unsafe impl Send for DataKey {}
unsafe impl Sync for DataKey {}

impl DataKey {
    /// Copies `bytes` (which must be 32 long) into locked memory.
    pub fn new(bytes: &[u8]) -> Option<DataKey> {
        if bytes.len() != DATA_KEY_LEN {
            return None;
        }
        let layout = Self::layout();
        // SAFETY: layout has non-zero size.
        let page = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // SAFETY: the page holds at least DATA_KEY_LEN bytes and is ours alone.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), page.as_ptr(), DATA_KEY_LEN) };
        let locked = unsafe { nix::sys::mman::mlock(page.cast(), layout.size()) }.is_ok();
        if !locked && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cannot lock key memory (RLIMIT_MEMLOCK too low?): keys may be swapped; raise LimitMEMLOCK"
            );
        }
        Some(DataKey { page, locked })
    }

    fn layout() -> Layout {
        let page = page_size();
        // A power of two at least DATA_KEY_LEN: always a valid layout.
        Layout::from_size_align(page, page).unwrap_or(Layout::new::<[u8; DATA_KEY_LEN]>())
    }

    pub fn expose(&self) -> &[u8; DATA_KEY_LEN] {
        // SAFETY: the page starts with DATA_KEY_LEN initialised bytes owned by self.
        unsafe { &*(self.page.as_ptr() as *const [u8; DATA_KEY_LEN]) }
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        let layout = Self::layout();
        // SAFETY: the page is ours, DATA_KEY_LEN long at least, and freed exactly once here.
        unsafe {
            std::slice::from_raw_parts_mut(self.page.as_ptr(), DATA_KEY_LEN).zeroize();
            if self.locked {
                let _ = nix::sys::mman::munlock(self.page.cast(), layout.size());
            }
            dealloc(self.page.as_ptr(), layout);
        }
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// Keeps secrets out of core dumps and out of reach of same-uid ptrace.
pub fn harden_process() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Under the unit, LimitCORE=0 has done it already (and the syscall filter refuses
    // setrlimit): only ask when it is not so.
    let already_off = getrlimit(Resource::RLIMIT_CORE).is_ok_and(|l| l == (0, 0));
    if !already_off {
        if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
            tracing::warn!(error = %e, "cannot disable core dumps");
        }
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_bytes_and_redacts() {
        let k = DataKey::new(&[7u8; 32]).unwrap();
        assert_eq!(k.expose(), &[7u8; 32]);
        assert_eq!(format!("{k:?}"), "DataKey(<redacted>)");
        assert!(DataKey::new(&[1u8; 16]).is_none());
    }
}
