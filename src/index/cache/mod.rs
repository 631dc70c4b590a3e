//! The lookup chain: the index mounted from the cache ConfigMap (reloaded on kubelet swaps)
//! → the ConfigMap through the API → a rebuild by scanning the cluster, which writes the
//! ConfigMap back. Lookups are answered from memory.

pub mod chain;
pub mod codec;
pub mod mount;
pub mod store;

pub use chain::{CacheChain, ChainConfig, ChainError, Origin};
