//! Integration tests of tollgate-client against real local servers on
//! 127.0.0.1:0. Waits are measured on tokio's paused clock.

mod load;
mod pacing;
mod retry;
mod support;
