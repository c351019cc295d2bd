//! etcd servers for tests (being written).
