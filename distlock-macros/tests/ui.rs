//! Misuse of `#[distlock::locked]` is a compile error that names the problem (see
//! `tests/ui/*.stderr`).
//!
//! Here rather than in `distlock`'s tests: trybuild checks the test crate's dependencies with
//! the features that crate was built with, and `distlock` under `--all-features` would have it
//! check every backend's dependency tree (over two minutes on a fresh target directory); this
//! crate's dev-dependency asks `distlock` for the macros alone.

#[test]
fn misuse_is_a_clear_compile_error() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
