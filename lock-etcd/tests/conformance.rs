//! The conformance suite on etcd: `single` (one node) and `cluster3` (a static 3-member
//! cluster). Each test starts its own etcd on free loopback ports (data on tmpfs, killed on
//! drop): a single node is ready in well under a second, and per-test servers keep a failing
//! case from leaking state into the next one.

mod common;

mod single {
    use super::common::EtcdFactory;
    conformance_tests::conformance_suite! {
        factory = EtcdFactory::start(1),
    }
}

mod cluster3 {
    use super::common::EtcdFactory;
    conformance_tests::conformance_suite! {
        factory = EtcdFactory::start(3),
    }
}
