//! Contract tests of the `tollgate` binary: they run the real executable.

mod check_config;
mod client;
mod crash;
mod multi;
mod serve;
mod support;
