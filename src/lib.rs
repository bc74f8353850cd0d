//! incountry-keyd: HSM-backed, versioned data keys per (environment, country), served to
//! local InCountry Border processes over HTTP on a Unix socket.
//!
//! Where a request goes: `api` (socket, peer credentials, routing) → `verify` (admin
//! verification codes) → `keyring` (live keys, key operations) → `hsm` (root keys, wrapping,
//! on a dedicated thread), `kms` (AWS KMS for customer-supplied keys) and `store` (SQLite
//! state). `daemon` wires them together;
//! `cli` and `client` are the command line.

pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod error;
pub mod hsm;
pub mod keyring;
pub mod kms;
pub mod metrics;
pub mod rewrap;
pub mod rotation;
pub mod store;
pub mod systemd;
pub mod verify;
