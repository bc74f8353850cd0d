//! incountry-keyd: HSM-backed, versioned data keys per (environment, country), served to
//! local InCountry Border processes over HTTP on a Unix socket.
//!
//! Layers, bottom to top; each module imports only from its own layer or below
//! (`LAYERS` lists them; `tests/layers.rs` fails on an import that goes up):
//! 1. `domain`: names, versions, snapshot, live key memory, limits, audit entries, errors,
//!    clock, the SDK record format;
//! 2. adapters: `store` (state behind the `Store` trait), `hsm`, `kms`, `config`, `systemd`;
//! 3. services: `keyring` (sole owner of the HSM, store and KMS handles), `verify`,
//!    `rotation`, `metrics`;
//! 4. `api` (socket, routing, request extraction, handlers per resource) and `proto` (the
//!    typed wire protocol: the server answers with it, the CLI and the tests read it);
//! 5. `daemon`: wiring only;
//! 6. `cli`: commands, the socket client, bulk rewrap.
//!
//! Where a request goes: `api::serve` accepts it → `api::routes` (method and path to a
//! typed route) → the handler of its resource in `api` (its body and headers through
//! `api::extract`) → `verify` (admin codes) → `keyring` (records too) → `hsm` / `store` /
//! `kms`; the answer is a `proto` type.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod domain;

pub mod config;
pub mod hsm;
pub mod kms;
pub mod store;
pub mod systemd;

pub mod keyring;
pub mod metrics;
pub mod rotation;
pub mod verify;

pub mod api;
pub mod proto;

pub mod daemon;

pub mod cli;

/// Every top-level module and its layer (1 = bottom). A module may import only from
/// modules of its own layer or below; `tests/layers.rs` checks the source against this.
pub const LAYERS: &[(&str, u8)] = &[
    ("domain", 1),
    ("config", 2),
    ("hsm", 2),
    ("kms", 2),
    ("store", 2),
    ("systemd", 2),
    ("keyring", 3),
    ("metrics", 3),
    ("rotation", 3),
    ("verify", 3),
    ("api", 4),
    ("proto", 4),
    ("daemon", 5),
    ("cli", 6),
];
