//! The distlock conformance suite on PostgreSQL.
//!
//! One server per test binary (see `common`), a fresh factory and fresh backends per test:
//! every case uses its own random keys, so tests run in parallel on the shared server.

mod common;

conformance_tests::conformance_suite! {
    factory = common::PgFactory::start(),
    skip = {
        fair_queue_serves_waiters_in_arrival_order: "no fair queue: try-lock attempts woken by NOTIFY, whichever comes first gets the key (Capabilities::fair_queue is false; see README)",
        fences_increase_across_a_server_restart: "one PostgreSQL server is shared by every case of this binary and \
            crashing it would fail the cases beside it: this case runs on a dedicated server \
            (asynchronous commit) in tests/dedicated.rs",
        server_pause_fires_lost: "one PostgreSQL server is shared by every case of this binary and \
            pausing it would stall the cases beside it: this case runs on a dedicated server in \
            tests/dedicated.rs",
    },
}
