//! conformance-tests (work in progress).
