//! Live key availability: unwrapped data keys in locked, zeroized memory. These types are never
//! Serialize and their Debug prints no bytes.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use zeroize::Zeroize;

pub const DATA_KEY_LEN: usize = 32;

/// Length of the GCM IV used to wrap data keys (the daemon supplies it: SoftHSM cannot).
pub const WRAP_IV_LEN: usize = 12;

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
        let mut key = Self::zeroed()?;
        key.bytes_mut().copy_from_slice(bytes);
        Some(key)
    }

    /// A page of zeros, locked before anything is written to it: a new key is written
    /// straight into it (`bytes_mut`), so its bytes are never on a stack, in a channel or in
    /// a buffer of their own.
    pub fn zeroed() -> Option<DataKey> {
        let layout = Self::layout();
        // SAFETY: layout has non-zero size.
        let page = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // SAFETY: the page is ours alone and `layout.size()` long.
        let locked = unsafe { nix::sys::mman::mlock(page.cast(), layout.size()) }.is_ok();
        if !locked && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cannot lock key memory (RLIMIT_MEMLOCK too low?): keys may be swapped; raise LimitMEMLOCK"
            );
        }
        Some(DataKey { page, locked })
    }

    /// The key's bytes, to write a new key in place (only while it is not shared yet).
    pub fn bytes_mut(&mut self) -> &mut [u8; DATA_KEY_LEN] {
        // SAFETY: the page starts with DATA_KEY_LEN initialised bytes owned by self, and
        // `&mut self` makes this the only reference.
        unsafe { &mut *(self.page.as_ptr() as *mut [u8; DATA_KEY_LEN]) }
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

/// Overwrites the stack below the caller's frame, where functions that have returned (AES
/// key expansion, cipher state moved between frames, encoders, HSM calls) left copies of key
/// bytes that no destructor reaches. Called by a function after such work, before it
/// returns. 64 KiB: more than the deepest such work below its caller uses, in debug builds
/// too.
pub fn clear_stack() {
    scrub_stack::<8192>();
}

/// `clear_stack` after a call into the AWS SDK (a KMS Decrypt: HTTP, JSON and base64 of
/// the answer), whose frames reach much deeper: 512 KiB (runtime threads have 2 MiB).
pub fn clear_stack_deep() {
    scrub_stack::<65536>();
}

#[inline(never)]
fn scrub_stack<const WORDS: usize>() {
    let mut scrub = [0u64; WORDS];
    scrub.zeroize();
    std::hint::black_box(&scrub);
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
        let mut made = DataKey::zeroed().unwrap();
        made.bytes_mut().copy_from_slice(&[9u8; 32]);
        assert_eq!(made.expose(), &[9u8; 32]);
        clear_stack();
    }
}
