//! Record throughput: the full record path (`crypto::encrypt`/`decrypt`: OS RNG salt and IV,
//! AES-256-GCM, base64) against raw AES-256-GCM on the same plaintexts, as a ratio, so the
//! number means something on any machine. `cargo bench --bench records`
//! (`RECORDS_BENCH_N` records per size; default 20,000).

use std::hint::black_box;
use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use incountry_keyd::domain::crypto;

fn rate(n: usize, f: impl FnMut(usize)) -> f64 {
    let mut f = f;
    let started = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("RECORDS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let key = [7u8; 32];
    let cipher = Aes256Gcm::new((&key).into());
    println!("records/s over {n} records; ratio = full record path / raw AES-256-GCM");
    for size in [64usize, 1024, 16 * 1024] {
        let plaintext = vec![b'r'; size];
        let raw = rate(n, |i| {
            let mut buf = plaintext.clone();
            let mut iv = [0u8; 12];
            iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&iv), b"", &mut buf)
                .unwrap();
            black_box((buf, tag));
        });
        let record = crypto::encrypt(&key, &plaintext).unwrap();
        let enc = rate(n, |_| {
            black_box(crypto::encrypt(&key, black_box(&plaintext)).unwrap());
        });
        let dec = rate(n, |_| {
            black_box(crypto::decrypt(&key, black_box(&record)).unwrap());
        });
        println!(
            "{size:>6} B  raw {raw:>10.0}/s  encrypt {enc:>10.0}/s ({:.2}x)  decrypt {dec:>10.0}/s ({:.2}x)",
            enc / raw,
            dec / raw
        );
    }
}
