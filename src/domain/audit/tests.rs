//! The chain walk: links, hashes, MACs, and entries from before MACs.

use super::*;

/// A chain of `n` entries; entries `macs_from..` carry the MAC `mac_of(hash)`.
fn chain(n: i64, macs_from: i64) -> Vec<AuditRecord> {
    let mut prev = GENESIS.to_string();
    (1..=n)
        .map(|seq| {
            let e = AuditEntry::new(seq, &Actor::Timer, "rotate", None);
            let mut r = AuditRecord::chain(seq, e, prev.clone());
            if seq >= macs_from {
                r.mac = Some(mac_of(&r.hash));
            }
            prev = r.hash.clone();
            r
        })
        .collect()
}

fn mac_of(hash: &str) -> String {
    hex::encode(Sha256::digest(entry_mac_input(hash)))
}

fn run(
    records: &[AuditRecord],
    from: Start,
    legacy_until: Option<i64>,
) -> Result<Walked, (i64, String)> {
    let mut read = |since: i64, limit: usize| {
        Ok(records
            .iter()
            .filter(|r| r.seq > since)
            .take(limit)
            .cloned()
            .collect())
    };
    let mut check = |hashes: &[String]| Ok(hashes.iter().map(|h| mac_of(h)).collect());
    let macs = legacy_until.map(|legacy_until| Macs {
        check: &mut check,
        legacy_until,
    });
    walk(&mut read, from, macs).unwrap()
}

#[test]
fn entries_from_before_macs_pass_only_before_the_first_maced_one() {
    let records = chain(6, 3);
    let w = run(&records, Start::genesis(), Some(4)).unwrap();
    assert_eq!((w.entries, w.macs_checked, w.legacy), (6, 4, 2));
    // A MAC removed after MACed entries.
    let mut cut = records.clone();
    cut[4].mac = None;
    assert_eq!(run(&cut, Start::genesis(), Some(4)).unwrap_err().0, 5);
    // Entries past the anchor must carry one.
    let legacy = chain(3, 99);
    let err = run(&legacy, Start::genesis(), Some(2)).unwrap_err();
    assert_eq!(err.0, 3);
    assert!(err.1.contains("after the HSM anchor"), "{}", err.1);
    // Without the HSM, MACs are not looked at.
    assert_eq!(run(&cut, Start::genesis(), None).unwrap().entries, 6);
}

#[test]
fn a_wrong_mac_a_gap_or_an_edit_breaks_the_walk() {
    let records = chain(4, 1);
    let mut forged = records.clone();
    forged[1].mac = Some(mac_of("another hash"));
    let err = run(&forged, Start::genesis(), Some(0)).unwrap_err();
    assert_eq!(err.0, 2);
    assert!(err.1.contains("MAC does not match"), "{}", err.1);
    let mut gap = records.clone();
    gap.remove(2);
    assert_eq!(run(&gap, Start::genesis(), Some(0)).unwrap_err().0, 3);
    let mut edited = records.clone();
    edited[3].entry.detail = "x".into();
    assert_eq!(run(&edited, Start::genesis(), Some(0)).unwrap_err().0, 4);
    // From an anchored entry, taken as stored; one that is not there is missing.
    let from = |seq| Start { seq, prev: None };
    assert_eq!(run(&records, from(3), Some(3)).unwrap().entries, 2);
    assert_eq!(run(&records, from(5), Some(5)).unwrap_err().0, 5);
}
