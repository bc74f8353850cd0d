//! Fault suite. Each test starts the real binary against a fresh SoftHSM token.
//!
//! - `hsm`: HSM faults the daemon must recover from by itself (token directory moved away or
//!   unreadable, a descriptor shortage during a change), a start without the token
//!   directory, and SoftHSM token files a kill left cut short;
//! - `connections`: descriptor exhaustion by a hostile local uid, a paused daemon, request
//!   deadlines, the memory of a connection burst;
//! - `disk`: a full state disk;
//! - `crash`: SIGKILLs at random moments under admin load (crash consistency; the model of
//!   what must survive in `crash/model.rs`);
//! - `hostile`: hostile clients sending malformed HTTP and JSON (the daemon stays up, answers
//!   well-formed requests correctly, does not panic, and its memory stays bounded); the
//!   malformed requests in `hostile/head.rs`, `hostile/framing.rs` and `hostile/json.rs`;
//! - `support`: what they share (besides the `harness` crate).
//!
//! Randomness comes from a small deterministic PRNG seeded from the time; the seed is printed
//! and `KEYD_FAULT_SEED=N` replays a run's choices (the kill moments themselves still depend
//! on scheduling). What is asserted never depends on timing, except generous liveness limits.

mod connections;
mod crash;
mod disk;
mod hostile;
mod hsm;
mod support;
