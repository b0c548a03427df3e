//! Integration tests of tollgate-core: one binary, one module per area.

mod concurrency;
mod presets;
mod properties;
mod memory;
