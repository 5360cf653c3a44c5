//! Admission counting: whether one more migration may leave a node, from the list of all
//! migrations. Pure: the caller lists, holds the admission lock, and acts on the answer.

use kube::ResourceExt;

use crate::crd::{Phase, VirtualMachineMigration};

/// The limits admission enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Migrations past Pending and not finished, cluster-wide.
    pub max_parallel: usize,
    /// Such migrations leaving one node.
    pub max_parallel_per_node: usize,
}

/// The migration asking to be admitted.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub source_pod: &'a str,
    pub source_node: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A slot is free. `queued` counts the others waiting in Pending.
    Admit { queued: i64 },
    /// Every slot is taken: wait. `why` is the message for status.
    Queue { why: String, queued: i64 },
    /// Another active migration moves the same pod.
    Duplicate { other: String },
}

pub fn decide(all: &[VirtualMachineMigration], me: Candidate<'_>, limits: Limits) -> Admission {
    let (mut active, mut on_node, mut queued) = (0usize, 0usize, 0i64);
    for m in all {
        if m.uid().as_deref() == Some(me.uid) {
            continue;
        }
        let phase = m.phase();
        if phase == Some(Phase::Pending) {
            queued += 1;
        }
        if !phase.is_some_and(Phase::is_active) {
            continue;
        }
        if m.namespace().as_deref() == Some(me.namespace) && m.spec.source.pod == me.source_pod {
            return Admission::Duplicate {
                other: m.name_any(),
            };
        }
        active += 1;
        if m.status.as_ref().and_then(|s| s.source_node.as_deref()) == Some(me.source_node) {
            on_node += 1;
        }
    }
    if active >= limits.max_parallel {
        let limit = limits.max_parallel;
        Admission::Queue {
            why: format!("queued: {active} migrations are running cluster-wide (limit {limit})"),
            queued,
        }
    } else if on_node >= limits.max_parallel_per_node {
        let limit = limits.max_parallel_per_node;
        Admission::Queue {
            why: format!(
                "queued: {on_node} migrations are leaving node {} (limit {limit})",
                me.source_node
            ),
            queued,
        }
    } else {
        Admission::Admit { queued }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MigrationSource, VirtualMachineMigrationSpec, VirtualMachineMigrationStatus};

    fn mig(
        name: &str,
        pod: &str,
        phase: Option<Phase>,
        node: Option<&str>,
    ) -> VirtualMachineMigration {
        let mut m = VirtualMachineMigration::new(
            name,
            VirtualMachineMigrationSpec {
                source: MigrationSource { pod: pod.into() },
                target: Default::default(),
                policy: Default::default(),
                keep_source: false,
            },
        );
        m.metadata.namespace = Some("vms".into());
        m.metadata.uid = Some(format!("uid-{name}"));
        m.status = Some(VirtualMachineMigrationStatus {
            phase,
            source_node: node.map(String::from),
            ..Default::default()
        });
        m
    }

    const LIMITS: Limits = Limits {
        max_parallel: 3,
        max_parallel_per_node: 2,
    };

    fn me(pod: &str, node: &'static str) -> Candidate<'static> {
        Candidate {
            uid: "uid-me",
            namespace: "vms",
            source_pod: Box::leak(pod.to_string().into_boxed_str()),
            source_node: node,
        }
    }

    #[test]
    fn counts_only_active_migrations_and_queues_by_node_then_cluster() {
        let all = vec![
            mig("a", "p1", Some(Phase::PreCopy), Some("n1")),
            mig("b", "p2", Some(Phase::Scheduling), Some("n1")),
            mig("c", "p3", Some(Phase::Succeeded), Some("n1")),
            mig("d", "p4", Some(Phase::Pending), None),
        ];
        assert_eq!(
            decide(&all, me("p9", "n2"), LIMITS),
            Admission::Admit { queued: 1 }
        );
        match decide(&all, me("p9", "n1"), LIMITS) {
            Admission::Queue { why, queued } => {
                assert!(why.contains("leaving node n1 (limit 2)"), "{why}");
                assert_eq!(queued, 1);
            }
            other => panic!("{other:?}"),
        }
        let mut busy = all.clone();
        busy.push(mig("e", "p5", Some(Phase::PostCopy), Some("n3")));
        match decide(&busy, me("p9", "n2"), LIMITS) {
            Admission::Queue { why, .. } => {
                assert!(why.contains("cluster-wide (limit 3)"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_second_active_migration_of_the_same_pod_is_a_duplicate_but_itself_is_not() {
        let mut all = vec![mig("a", "p1", Some(Phase::PreCopy), Some("n1"))];
        assert_eq!(
            decide(&all, me("p1", "n1"), LIMITS),
            Admission::Duplicate { other: "a".into() }
        );
        all[0].metadata.uid = Some("uid-me".into());
        assert_eq!(
            decide(&all, me("p1", "n1"), LIMITS),
            Admission::Admit { queued: 0 }
        );
    }
}
