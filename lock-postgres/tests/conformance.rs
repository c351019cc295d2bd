//! The distlock conformance suite on PostgreSQL.
//!
//! One server per test binary (see `common`), a fresh factory and fresh backends per test:
//! every case uses its own random keys, so tests run in parallel on the shared server.

mod common;

conformance_tests::conformance_suite! {
    factory = common::PgFactory::start(),
}
