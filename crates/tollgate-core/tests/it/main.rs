//! Integration tests of tollgate-core: one binary, one module per area.

mod concurrency;
mod in_memory;
mod memory;
mod modes;
mod presets;
mod properties;
