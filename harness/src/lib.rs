//! kvcoord-harness: everything that exercises kvcoord without being part of
//! it. The product (the `kvcoord` library and binary, the client crate) must
//! never depend on this crate.
//!
//! - [`tp_worker::TpWorker`]: ONE TP-worker type, over [`block_access::BlockAccess`]
//!   (host memfd in [`block_access::HostBlocks`], GPU memory in
//!   [`gpu_blocks::GpuBlocks`]), through the same client engines use.
//! - [`pattern`]: deterministic KV contents and prompts, verifiable byte for byte.
//! - The `kvcoord-harness` binary's commands: [`demo`], [`bench`],
//!   [`gpu_check`], and the load generators ([`load`]) they and the tests
//!   start as processes; [`child`] starts a coordinator process.

pub mod bench;
pub mod block_access;
pub mod child;
pub mod client_bench;
pub mod demo;
pub mod gpu_baselines;
pub mod gpu_blocks;
pub mod gpu_check;
pub mod load;
pub mod pattern;
pub mod tp_worker;

pub use block_access::{BlockAccess, HostBlocks};
pub use pattern::prefix_hashes;
pub use tp_worker::{TpWorker, Verified};
