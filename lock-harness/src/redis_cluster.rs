//! Redis Cluster for tests (work in progress).
