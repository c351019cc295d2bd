//! lock-etcd (work in progress).
