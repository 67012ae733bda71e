//! The PostgreSQL integration tests use the crate's `testing` support (fresh database per test).

pub use securepay_postgres::testing::*;
