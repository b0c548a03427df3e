//! Contract tests of the `tollgate` binary: they run the real executable.

mod check_config;
mod client;
mod multi;
mod serve;
mod support;
