//! The Envoy dynamic-module glue (`make native`), and the only code that touches that ABI: the
//! same config and pipeline as `src/wasm/`, through a C ABI instead of proxy-wasm.
//!
//! Threads: Envoy creates a filter config on its main thread and a filter per stream on a worker
//! thread. Each thread parses the config once into its own `Config` and `Worker` (the pipeline's
//! per-worker state, as each wasm VM has its own); shared data is the process-wide `store`. What a
//! wasm root context does runs on the main thread: streams hand their settlements over and wake
//! it through the config's scheduler, its callouts go through the config's HTTP callouts, and a
//! timer thread of ours (the ABI has no timer) only commits a tick to that scheduler once a second.
//!
//! No panic crosses into Envoy: every hook runs under `catch_unwind`, and a request whose handling
//! panicked is answered 500 while Envoy keeps running.

// Unit tests build the store without the glue that uses it (that needs Envoy's symbols to link).
#[cfg_attr(not(feature = "native"), allow(dead_code, reason = "used by the native glue only"))]
pub mod store;

#[cfg(feature = "native")]
mod abi;
#[cfg(feature = "native")]
mod hooks;
#[cfg(feature = "native")]
mod host;

#[cfg(feature = "native")]
pub use hooks::Plugin;

/// A request allocates a few dozen small blocks (its headers, the identity, the rate-limit
/// headers' values). Through Envoy's malloc each allocation and free cost about 200 instructions
/// under callgrind, a fifth of what the module itself does per request; mimalloc's thread-local
/// free lists take a fraction of that. Envoy never frees what the module allocates, nor the
/// other way round, so the two allocators never meet.
#[cfg(feature = "native")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
