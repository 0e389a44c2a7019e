//! What `vmctl` and the agent say to each other over the agent's Unix socket: one JSON
//! request line, one JSON reply line. Shared by both binaries (`#[path]`-included by vmctl).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"move","core":N,"to":"GUEST","timeout_ms":MS,
//! "negotiable":BOOL}` (the owner may decline),
//! `{"cmd":"stats","reset":BOOL}` (a reset needs root).
//! `{"cmd":"rebalance","policy":"static|autonomous|cooperative","period_ms":MS}` (0: keep).
//! Replies: `{"ok":true, ...}` or `{"ok":false,"code":CODE,"message":TEXT}`; vmctl turns
//! each code into its exit status.

/// Where the agent listens. Anyone may connect (reading status is open); the agent checks
/// the peer's uid for commands that change state.
pub const SOCKET: &str = "/run/tandem/vmctl.sock";
