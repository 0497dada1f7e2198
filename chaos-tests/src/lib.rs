//! Tandem under faults (issue 20): real clusters driven by recorded workloads, nemeses, and
//! checkers over the histories they leave. Built in steps; what exists:
//!
//! - `linearizability.rs`: whether a history of operations on a shared object (a tenant's
//!   adapter, a job) could have happened one at a time in an order that respects real time, as
//!   the object's sequential model says: Wing and Gong's search with Lowe's memoisation (the
//!   algorithm of Knossos and Porcupine), per key.
//! - `models.rs`: the objects' sequential models (the adapter registry), each tested against
//!   the coordinators' state machine.

pub mod linearizability;
pub mod models;
