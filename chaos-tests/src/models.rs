//! The sequential models the chaos histories are checked against: what the cluster's
//! replicated state promises for each object, one operation at a time. Each is tested against
//! the state machine itself (`tests/models.rs`), so a model cannot drift from the product.

use super::linearizability::Model;

/// A tenant's adapter, by name: uploads make versions 1, 2, ...; a delete forgets the name (the
/// next upload is version 1 again); a read sees the latest version.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterRegistry;

/// An operation on adapter `name` of `tenant`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterOp {
    Put { tenant: String, name: String },
    Delete { tenant: String, name: String },
    Get { tenant: String, name: String },
}

/// What the cluster answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterAnswer {
    /// The version an upload made.
    Version(u64),
    Deleted,
    /// A delete of a name that does not exist.
    NotFound,
    /// The latest version a read saw (none: no such adapter).
    Latest(Option<u64>),
}

impl Model for AdapterRegistry {
    /// The latest version, if the name exists.
    type State = Option<u64>;
    type Input = AdapterOp;
    type Output = AdapterAnswer;
    type Key = (String, String);

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(&self, latest: &Option<u64>, op: &AdapterOp, answer: Option<&AdapterAnswer>) -> Option<Option<u64>> {
        let (next, expected) = match op {
            AdapterOp::Put { .. } => {
                let version = latest.map_or(1, |v| v + 1);
                (Some(version), AdapterAnswer::Version(version))
            }
            AdapterOp::Delete { .. } if latest.is_some() => (None, AdapterAnswer::Deleted),
            AdapterOp::Delete { .. } => (None, AdapterAnswer::NotFound),
            AdapterOp::Get { .. } => (*latest, AdapterAnswer::Latest(*latest)),
        };
        answer.is_none_or(|a| *a == expected).then_some(next)
    }

    fn key(&self, op: &AdapterOp) -> (String, String) {
        match op {
            AdapterOp::Put { tenant, name } | AdapterOp::Delete { tenant, name } | AdapterOp::Get { tenant, name } => {
                (tenant.clone(), name.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linearizability::{Operation, Verdict, check};

    fn put(call: u64, ret: u64, version: u64) -> Operation<AdapterOp, AdapterAnswer> {
        let input = AdapterOp::Put { tenant: "t".into(), name: "a".into() };
        Operation { input, call, ret: Some((ret, AdapterAnswer::Version(version))) }
    }

    #[test]
    fn concurrent_uploads_make_distinct_versions_and_a_lost_update_is_caught() {
        // Two clients upload at once: versions 1 and 2, in either order.
        assert_eq!(check(&AdapterRegistry, &[put(0, 10, 2), put(1, 9, 1)], 1000), Verdict::Linearizable);
        // Both told version 1: one upload was lost.
        let lost = [put(0, 10, 1), put(1, 9, 1)];
        assert_eq!(check(&AdapterRegistry, &lost, 1000), Verdict::Violation { key: ("t".into(), "a".into()) });
    }
}
