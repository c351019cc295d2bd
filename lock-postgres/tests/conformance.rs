//! The distlock conformance suite on PostgreSQL.
//!
//! One server per test binary (see `common`), a fresh factory and fresh backends per test:
//! every case uses its own random keys, so tests run in parallel on the shared server.

mod common;

conformance_tests::conformance_suite! {
    factory = common::PgFactory::start(),
    skip = {
        server_pause_fires_lost: "one PostgreSQL server is shared by every case of this binary and \
            pausing it would stall the cases beside it: this case runs on a dedicated server in \
            tests/server_pause.rs",
        semaphore_never_exceeds_permits: "semaphores are not implemented on this backend yet (issue #14; Capabilities::semaphores is false)",
        semaphore_dead_holder_permit_returns: "semaphores are not implemented on this backend yet (issue #14; Capabilities::semaphores is false)",
        semaphore_limits_must_agree: "semaphores are not implemented on this backend yet (issue #14; Capabilities::semaphores is false)",
        semaphore_loss_and_cancel: "semaphores are not implemented on this backend yet (issue #14; Capabilities::semaphores is false)",
        semaphore_release_wakes_waiter: "semaphores are not implemented on this backend yet (issue #14; Capabilities::semaphores is false)",
        rwlock_readers_share_writers_exclude: "reader-writer locks are not implemented on this backend yet (issue #14; Capabilities::rw_locks is false)",
        rwlock_writer_not_starved: "reader-writer locks are not implemented on this backend yet (issue #14; Capabilities::rw_locks is false)",
        rwlock_loss_and_expiry: "reader-writer locks are not implemented on this backend yet (issue #14; Capabilities::rw_locks is false)",
    },
}
