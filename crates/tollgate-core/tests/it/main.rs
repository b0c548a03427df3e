//! Integration tests of tollgate-core: one binary, one module per area.

mod concurrency;
mod memory;
mod modes;
mod presets;
mod properties;
