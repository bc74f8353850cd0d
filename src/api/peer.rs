//! Who is on the other end of a connection, from the kernel (SO_PEERCRED, SO_PEERGROUPS).

use std::os::fd::AsRawFd;

use tokio::net::UnixStream;

use crate::config::AccessPolicy;
use crate::domain::error::{Error, Result};
use crate::domain::Caller;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    None,
    Reader,
    Admin,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Primary and supplementary groups of the peer process at connect time.
    pub groups: Vec<u32>,
    /// The role under the access lists in force when the current request began.
    pub role: Role,
}

impl Peer {
    pub fn of(stream: &UnixStream, access: &AccessPolicy) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let mut groups = peer_groups(stream).unwrap_or_default();
        groups.push(cred.gid());
        let mut peer = Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
            role: Role::None,
        };
        peer.role = peer.role_in(access);
        Ok(peer)
    }

    /// Who this is, for the layers below the api (audit, verification).
    pub fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }

    /// 403 unless the peer may read (every route but health needs it).
    pub fn require_reader(&self) -> Result<()> {
        if self.role < Role::Reader {
            return Err(Error::forbidden(format!(
                "uid {} is not in access.readers or access.admins",
                self.uid
            )));
        }
        Ok(())
    }

    /// 403 unless the peer is an admin (changes, enrollment, the audit log).
    pub fn require_admin(&self) -> Result<()> {
        if self.role < Role::Admin {
            return Err(Error::forbidden(format!(
                "uid {} is not in access.admins",
                self.uid
            )));
        }
        Ok(())
    }

    /// The role these credentials have under `access` (the lists in force may have changed
    /// since the connection was accepted).
    pub fn role_in(&self, access: &AccessPolicy) -> Role {
        if access.admins.admits(self.uid, &self.groups) {
            Role::Admin
        } else if access.readers.admits(self.uid, &self.groups) {
            Role::Reader
        } else {
            Role::None
        }
    }
}

/// SO_PEERGROUPS (Linux 4.13+): the peer's supplementary groups as of connect().
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    // Not exported by the libc crate for every target; 59 on all Linux ABIs we build for.
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes long and outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<u32>());
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // ERANGE: the kernel put the size it needs in `len`.
        if err.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65_536 {
            groups.resize(len as usize / std::mem::size_of::<u32>() + 1, 0);
            continue;
        }
        return Err(err);
    }
}
