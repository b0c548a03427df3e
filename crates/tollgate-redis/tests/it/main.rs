//! Integration tests of the Redis store: the conformance suite, exact
//! accuracy under concurrency (with a non-atomic teeth variant), TTL hygiene,
//! error mapping and outage/recovery on a redis-server of our own.

mod accuracy;
mod agreement;
mod chaos;
mod cluster;
mod conformance;
mod errors;
mod faults;
mod flood;
mod resilience;
mod support;
