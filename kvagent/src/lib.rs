//! kvtier's agent: `kvagent node`, the per-node daemon that owns the KV-cache tiers and serves
//! engines over a local socket, with its configuration and metrics.

mod chat;
pub mod config;
pub mod hash;
mod http;
pub mod index;
pub mod metrics;
pub mod node;
pub mod route;
pub mod score;
mod tokenizer;
