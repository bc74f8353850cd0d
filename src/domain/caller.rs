//! Who asked: the process on the other end of a connection, as the kernel reported it.

/// The credentials of a caller, for the audit log and per-uid state (verification codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}
