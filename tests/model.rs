//! Model-based test: random operation sequences run against the real cache
//! (each driver, real files) and a small in-memory model
//! (`imgcache::fuzzing`, shared with the `ops` fuzz target); after every
//! step the two must agree on everything the cache reports.

use imgcache::testing::{run, Op, Store, IDS};
use proptest::prelude::*;

/// Cases per driver; `PROPTEST_CASES` overrides it.
const CASES: u32 = 256;

fn op() -> impl Strategy<Value = Op> {
    let i = 0..IDS.len();
    prop_oneof![
        3 => i.clone().prop_map(Op::Queue),
        4 => (i.clone(), any::<u64>(), 0usize..3000).prop_map(|(i, s, l)| Op::WriteCommit(i, s, l)),
        1 => (i.clone(), 0usize..3000).prop_map(|(i, l)| Op::WriteAbort(i, l)),
        2 => (i.clone(), any::<u64>(), 0usize..3000).prop_map(|(i, s, l)| Op::Begin(i, s, l)),
        2 => (i.clone(), any::<bool>()).prop_map(|(i, c)| Op::Finish(i, c)),
        4 => i.clone().prop_map(Op::Read),
        2 => i.clone().prop_map(Op::DeleteOne),
        1 => Just(Op::DeleteAll),
        1 => i.clone().prop_map(Op::DeleteQueued),
        1 => Just(Op::DeleteAllQueued),
        2 => (0u64..8000).prop_map(Op::Prune),
        1 => Just(Op::Clean),
        3 => (0u64..3).prop_map(Op::Tick),
        1 => Just(Op::Reopen),
    ]
}

fn check(kind: Store, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    run(kind, dir.path(), &ops).map_err(TestCaseError::fail)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CASES),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sqlite_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        check(Store::SQLITE, ops)?;
    }

    #[test]
    fn xattr_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        check(Store::XATTR, ops)?;
    }
}

proptest! {
    // A round trip to the database per query: a quarter of the cases.
    #![proptest_config(ProptestConfig { cases: config().cases / 4, ..config() })]

    #[test]
    fn centralized_db_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        if let Some(store) = Store::centralized_db() {
            check(store, ops)?;
        }
    }
}
