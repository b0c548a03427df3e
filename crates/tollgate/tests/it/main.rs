//! Contract tests of the `tollgate` binary: they run the real executable.

mod abuse;
mod check_config;
mod client;
mod crash;
mod db_crash;
mod leases;
mod multi;
mod reload;
mod serve;
mod smuggling;
mod support;
