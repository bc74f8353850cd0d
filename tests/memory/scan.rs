//! Reads a running daemon's memory the way root can (`/proc/PID/smaps` for its mappings and
//! which of them are locked, `/proc/PID/mem` for their bytes) and counts where given byte
//! strings occur.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

/// One mapping of the daemon.
struct Region {
    start: u64,
    end: u64,
    perms: String,
    name: String,
    /// `Locked:` in smaps: the pages `mlock` holds (the keyring's key pages).
    locked_kb: u64,
}

/// Each thread's stack pointer (from `/proc/PID/task/TID/syscall` while it waits in a system
/// call) with its name: to say whose stack a copy is on.
fn thread_stacks(pid: u32) -> Vec<(u64, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let syscall = std::fs::read_to_string(dir.join("syscall")).ok()?;
            let sp = syscall.split_whitespace().rev().nth(1)?;
            let sp = u64::from_str_radix(sp.trim_start_matches("0x"), 16).ok()?;
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            Some((sp, comm.trim().to_string()))
        })
        .collect()
}

fn regions(pid: u32) -> Vec<Region> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out: Vec<Region> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = fields.next().unwrap_or_default().to_string();
                let name = fields.nth(3).unwrap_or_default().to_string();
                out.push(Region {
                    start,
                    end,
                    perms,
                    name,
                    locked_kb: 0,
                });
                continue;
            }
        }
        if first == "Locked:" {
            if let Some(r) = out.last_mut() {
                r.locked_kb = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
    }
    for (sp, comm) in thread_stacks(pid) {
        if let Some(r) = out.iter_mut().find(|r| r.start <= sp && sp < r.end) {
            if r.name.is_empty() || r.name == "[stack]" {
                r.name = format!("[stack of {comm}]");
            }
        }
    }
    out
}

/// Where one needle was found.
#[derive(Debug, Clone)]
pub struct Hit {
    pub address: u64,
    /// Inside a mapping with locked pages (where the keyring keeps its keys).
    pub locked: bool,
    /// The mapping's name (`[heap]`, `[stack]`, empty for anonymous memory).
    pub region: String,
}

/// The occurrences of each needle in every readable and writable mapping of `pid` (data can
/// only be written at run time where memory is writable: code and read-only file mappings
/// are skipped). Root (CAP_SYS_PTRACE) can read a non-dumpable process's memory.
pub fn scan(pid: u32, needles: &[Vec<u8>]) -> Vec<Vec<Hit>> {
    let longest = needles.iter().map(Vec::len).max().unwrap_or(1);
    let mut first = [false; 256];
    for n in needles {
        first[n[0] as usize] = true;
    }
    let mut mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (root)");
    let mut hits = vec![Vec::new(); needles.len()];
    let mut scanned = 0u64;
    for r in regions(pid) {
        if !r.perms.starts_with("rw") || r.name == "[vvar]" || r.name == "[vsyscall]" {
            continue;
        }
        // In chunks, each overlapping the last by a needle's length.
        const CHUNK: u64 = 4 << 20;
        let mut at = r.start;
        while at < r.end {
            let len = CHUNK.min(r.end - at);
            let mut buf = vec![0u8; len as usize];
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf).is_err() {
                break;
            }
            scanned += len;
            for (i, b) in buf.iter().enumerate() {
                if !first[*b as usize] {
                    continue;
                }
                for (n, needle) in needles.iter().enumerate() {
                    if buf[i..].starts_with(needle) {
                        hits[n].push(Hit {
                            address: at + i as u64,
                            locked: r.locked_kb > 0,
                            region: r.name.clone(),
                        });
                    }
                }
            }
            if at + len >= r.end {
                break;
            }
            at += len - (longest as u64 - 1).min(len - 1);
        }
    }
    assert!(scanned > 0, "nothing of the daemon's memory could be read");
    // A hit in an overlap is seen twice.
    for h in &mut hits {
        h.sort_by_key(|h| h.address);
        h.dedup_by_key(|h| h.address);
    }
    hits
}

/// Whether this process may read another's memory (`/proc/PID/mem` of a non-dumpable
/// daemon needs root's CAP_SYS_PTRACE).
pub fn can_read_memory() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// How many client connections the daemon holds: its descriptors that are connected Unix
/// stream sockets (`/proc/PID/net/unix`, state 03) with an address, which accepted ones
/// share with the listener. (Not the listener, which is not connected; not tokio's signal
/// socket pair, which has no address; not TCP connections to KMS.)
pub fn connections(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() >= 8 && f[4] == "0001" && f[5] == "03" && inodes.iter().any(|i| i == f[6])
        })
        .count()
}

/// Waits until the daemon has closed every client connection, then a little more for the
/// connection tasks to drop what they held.
pub fn wait_connections_closed(pid: u32) {
    harness::wait_until("the daemon to close its connections", 30, || {
        connections(pid) == 0
    });
    std::thread::sleep(Duration::from_millis(300));
}

/// One line per needle for the test's output: where its copies are.
pub fn describe(name: &str, hits: &[Hit]) -> String {
    let locked = hits.iter().filter(|h| h.locked).count();
    let places: Vec<String> = hits
        .iter()
        .map(|h| {
            format!(
                "{:#x}{}{}",
                h.address,
                if h.locked { " locked" } else { "" },
                if h.region.is_empty() {
                    String::new()
                } else {
                    format!(" {}", h.region)
                }
            )
        })
        .collect();
    format!(
        "{name}: {} copies ({locked} in locked pages, {} elsewhere) [{}]",
        hits.len(),
        hits.len() - locked,
        places.join(", ")
    )
}

/// A byte string to look for, and how many copies of it may be in the daemon's memory: in
/// locked pages exactly `locked` (the keyring's page of a live key: 1), elsewhere at most
/// `elsewhere` (0 unless a test names a copy it must allow).
pub struct Needle {
    pub name: String,
    pub bytes: Vec<u8>,
    pub locked: usize,
    pub elsewhere: usize,
}

impl Needle {
    pub fn none(name: impl Into<String>, bytes: &[u8]) -> Needle {
        Needle {
            name: name.into(),
            bytes: bytes.to_vec(),
            locked: 0,
            elsewhere: 0,
        }
    }

    /// Allows `n` copies outside locked pages (the test says which and why).
    pub fn allow(mut self, n: usize) -> Needle {
        self.elsewhere = n;
        self
    }

    /// The string whole and each half of it (a half found alone is half the secret; an
    /// AES-256 key schedule begins with the key's two halves).
    pub fn with_halves(name: &str, bytes: &[u8], locked: usize) -> Vec<Needle> {
        let half = bytes.len() / 2;
        [
            (name.to_string(), bytes),
            (format!("{name}, first half"), &bytes[..half]),
            (format!("{name}, second half"), &bytes[half..]),
        ]
        .into_iter()
        .map(|(name, b)| Needle {
            name,
            bytes: b.to_vec(),
            locked,
            elsewhere: 0,
        })
        .collect()
    }
}

/// Scans `pid` for `needles`; prints where each was found (`--nocapture`) and returns what
/// breaks the rules.
pub fn check(pid: u32, when: &str, needles: &[Needle]) -> Vec<String> {
    let bytes: Vec<Vec<u8>> = needles.iter().map(|n| n.bytes.clone()).collect();
    let hits = scan(pid, &bytes);
    let mut failures = Vec::new();
    eprintln!("-- {when}");
    for (n, hits) in needles.iter().zip(&hits) {
        eprintln!("{}", describe(&n.name, hits));
        let locked = hits.iter().filter(|h| h.locked).count();
        if locked != n.locked {
            failures.push(format!(
                "{when}: {}: {locked} copies in locked pages, expected {}",
                n.name, n.locked
            ));
        }
        if hits.len() - locked > n.elsewhere {
            failures.push(format!(
                "{when}: {}: {} copies outside locked pages, expected at most {}",
                n.name,
                hits.len() - locked,
                n.elsewhere
            ));
        }
    }
    failures
}
